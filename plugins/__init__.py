"""Built-in plugins, named in `pipeline:` by these names."""

BUILTIN = {
    "params": "plugins.params:Params",
}
