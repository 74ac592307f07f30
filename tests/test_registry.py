"""Plugins are found by entry point (built-ins and installed packages) or module:Class;
the core imports no plugin module by name, and nothing imports in a circle."""

import ast
import sys
from pathlib import Path

import pytest

from proxy import registry
from proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
providers: {sim: {type: simulated}}
models: [{name: m, deployments: [{provider: sim, model: m}]}]
pipeline:
  - %s
"""


@pytest.fixture
def installed_package(tmp_path, monkeypatch):
    """A plugin package as pip would install it: a module and a dist-info naming its
    entry point."""
    (tmp_path / "acme_plugins.py").write_text(
        "class Stamp:\n"
        "    def __init__(self, config, context):\n"
        "        self.config = config\n"
        "    async def __call__(self, call, call_next):\n"
        "        reply = await call_next(call)\n"
        "        reply.headers['x-acme'] = 'stamped'\n"
        "        return reply\n"
    )
    info = tmp_path / "acme_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[meshgate.plugins]\nstamp = acme_plugins:Stamp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.registered.cache_clear()
    yield
    registry.registered.cache_clear()
    sys.modules.pop("acme_plugins", None)


def test_builtins_are_registered_entry_points():
    assert {"auth", "quotas", "cache", "routing", "fallback", "params"} <= set(
        registry.registered()
    )


def test_an_installed_package_registers_a_plugin_by_name(installed_package):
    config = parse_config(CONFIG % "stamp", "t.yaml", env={})
    assert config.pipeline[0].name == "stamp"
    assert registry.plugin_class("stamp").__name__ == "Stamp"


def test_unknown_names_and_classes_are_config_errors():
    with pytest.raises(ImportError, match="no plugin registered as 'ghost'"):
        registry.plugin_class("ghost")
    with pytest.raises(ImportError, match="has no class 'Nope'"):
        registry.plugin_class("proxy.errors:Nope")
    with pytest.raises(ImportError, match="has no class 'log'"):
        registry.plugin_class("proxy.gateway:log")  # not a class


def _imports(path: Path, module: str) -> set[str]:
    """What `module` imports, at any depth, except under `if TYPE_CHECKING:`... which
    counts too: a circle of type-only imports is still a circle to a reader."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in ("proxy", "plugins"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return {m: (_imports(p, m) & modules.keys()) - {m} for m, p in modules.items()}


def test_the_import_graph_has_no_circle():
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(
                "import circle: " + " -> ".join(path[path.index(module) :] + [module])
            )
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert "proxy.gateway" in done and "plugins.cache.semantic" in done  # the walk saw them


def test_the_core_never_imports_a_plugin():
    graph = _graph()
    arrows = [(m, t) for m, targets in graph.items() if m.startswith("proxy") for t in targets
              if t.startswith("plugins")]  # fmt: skip
    assert arrows == []
