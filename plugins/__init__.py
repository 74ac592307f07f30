"""Built-in plugins, named in `pipeline:` by these names."""

BUILTIN = {
    "auth": "plugins.auth:Auth",
    "cache": "plugins.cache:Cache",
    "fallback": "plugins.fallback:Fallback",
    "params": "plugins.params:Params",
    "quotas": "plugins.quotas:Quotas",
    "routing": "plugins.routing:Routing",
}
