"""The built-in plugins. Each registers its `pipeline:` name as an entry point in
the group `meshgate.plugins` (see pyproject.toml), as a plugin package of your
own would."""
