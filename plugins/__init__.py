"""Built-in plugins, named in `pipeline:` by these names."""

BUILTIN = {
    "auth": "plugins.auth:Auth",
    "params": "plugins.params:Params",
    "quotas": "plugins.quotas:Quotas",
}
