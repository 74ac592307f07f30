"""The gateway's config file: its sections as frozen dataclasses, and the loader.

The names here are a public contract (users edit `proxy.yaml`); see
docs/config.md for the reference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import upstream
from proxy._schema import ConfigError, SettingError, Source, build, format_path
from proxy.health import HealthConfig, check_url
from proxy.prices import PriceConfig
from proxy.registry import plugin_class
from proxy.state import StateConfig
from proxy.tracing import TracingConfig

__all__ = ["Config", "ConfigError", "SettingError", "load_config", "parse_config"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 * MiB
    graceful_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 75.0  # longer than common load balancers' idle timeouts
    keep_alive_max_requests: int = 100_000
    backlog: int = 4096  # pending connections the kernel queues (capped by somaxconn)
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    header_timeout_s: float = 20.0  # a request's head, from its first byte
    max_connections: int | None = None  # per worker; default from the open-file limit
    admin_key: str | None = field(default=None, repr=False)  # guards /admin/*; none: off
    # /metrics shows every tenant's usage and spend: it needs this key (or the admin
    # key) as a bearer token, unless metrics_public says anyone may read it.
    metrics_key: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    access_log: bool = True
    log_level: str = "info"
    # Buffered answers at least this large are gzipped for clients that accept it
    # (never streams); null: never.
    gzip_min_bytes: int | None = 4096
    # How often each worker looks at the config file for a change (0: SIGHUP only).
    reload_check_s: float = 1.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be from 1 to 65535, not {self.port}")
        if self.backlog < 1:
            raise ValueError("backlog must be at least 1")
        if self.body_timeout_s <= 0 or self.header_timeout_s <= 0:
            raise ValueError("body_timeout_s and header_timeout_s must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.reload_check_s < 0:
            raise ValueError("reload_check_s cannot be negative")
        if self.gzip_min_bytes is not None and self.gzip_min_bytes < 0:
            raise ValueError("gzip_min_bytes cannot be negative")
        for name in ("admin_key", "metrics_key"):
            key = getattr(self, name)
            if key is not None and len(key) < 16:
                raise ValueError(f"{name} must be at least 16 characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentConfig:
    provider: str
    model: str
    name: str = ""
    price: PriceConfig | None = None  # else litellm's bundled price list, if installed
    weight: float = 1.0  # share of traffic under the weighted strategy
    context_window: int | None = None  # prompt tokens it takes; else the bundled price list's
    rpm: int | None = None  # caps every attempt is kept under (proxy/choice.py)
    tpm: int | None = None
    max_in_flight: int | None = None  # prefix-affinity spills over past this

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError("weight cannot be negative")
        for name in ("context_window", "rpm", "tpm", "max_in_flight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def label(self) -> str:
        return self.name or f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    name: str
    deployments: list[DeploymentConfig]
    owned_by: str = "meshgate"
    aliases: list[str] = field(default_factory=list)  # other names clients may use

    def __post_init__(self) -> None:
        if not self.deployments:
            raise ValueError("a model needs at least one deployment")


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One `pipeline:` entry: a built-in name or `module:Class`, and its settings."""

    name: str
    config: Any
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    providers: dict[str, Any] = field(default_factory=dict)
    models: list[ModelConfig] = field(default_factory=list)
    pipeline: list[PluginSpec] = field(default_factory=list)
    source: str = "<string>"
    located: Source | None = field(default=None, compare=False, repr=False)  # lines of keys

    def error(self, path: tuple, message: str) -> ConfigError:
        """An error about the setting at `path`, naming its file and line."""
        if self.located is None:
            return ConfigError(f"{self.source}: {format_path(path)}: {message}")
        return self.located.error(path, message)

    def shared_state_users(self) -> list[str]:
        """What keeps counters that must be shared by every worker: deployment caps
        and plugins that say they use the state."""
        stateful = []
        if any(d.rpm or d.tpm for m in self.models for d in m.deployments):
            stateful.append("deployment caps (rpm/tpm)")
        for spec in self.pipeline:
            uses_state = getattr(plugin_class(spec.name), "uses_state", None)
            if uses_state is not None and uses_state(spec.config, self):
                stateful.append(spec.name)
        return stateful

    def missing_secrets(self) -> dict[str, tuple[str, ...]]:
        """Providers that name environment variables which are not set."""
        return {n: p.missing_env for n, p in self.providers.items() if p.missing_env}


def load_config(path: str | os.PathLike) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return parse_config(text, str(path))


def parse_config(text: str, filename: str = "<string>", env=None) -> Config:
    src = Source(text, filename, env)
    data = src.data
    if not isinstance(data, dict):
        raise src.error((), "the config must be a mapping")
    if not data:
        raise ConfigError(f"{filename}: the config is empty (see proxy.yaml for an example)")
    known = {"server", "state", "health", "tracing", "providers", "models", "pipeline"}
    for key in data:
        if key not in known:
            raise src.error((key,), f"unknown key (expected one of: {', '.join(sorted(known))})")
    server = build(ServerConfig, data.get("server"), ("server",), src)
    state = build(StateConfig, data.get("state"), ("state",), src)
    providers = _providers(data.get("providers") or {}, src)
    models = build(list[ModelConfig], data.get("models") or [], ("models",), src)
    if not models:
        raise src.error(("models",), "no models: the gateway would serve nothing")
    _check_models(models, providers, src)
    health = build(HealthConfig, data.get("health"), ("health",), src)
    _check_health(health, providers, src)
    pipeline = _pipeline(data.get("pipeline") or [], src)
    tracing = build(TracingConfig, data.get("tracing"), ("tracing",), src)
    return Config(
        server=server,
        state=state,
        health=health,
        tracing=tracing,
        providers=providers,
        models=models,
        pipeline=pipeline,
        source=filename,
        located=src,
    )


def _providers(raw: Any, src: Source) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise src.error(("providers",), "must be a mapping of provider name to settings")
    out = {}
    for name, settings in raw.items():
        path = ("providers", name)
        if not isinstance(settings, dict):
            raise src.error(path, "must be a mapping")
        kind = settings.get("type")
        if kind not in upstream.PROVIDER_TYPES:
            choices = ", ".join(sorted(upstream.PROVIDER_TYPES))
            raise src.error(path + ("type",), f"must be one of {choices}, not {kind!r}")
        missing: list[str] = []
        config = build(upstream.config_class(kind), settings, path, src, missing=missing)
        if not missing and getattr(config, "base_url", None) == "":
            raise src.error(path + ("base_url",), "must not be empty")
        out[name] = dataclasses.replace(config, missing_env=tuple(dict.fromkeys(missing)))
    return out


def _check_models(models: list[ModelConfig], providers: dict, src: Source) -> None:
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        for name, path in [(model.name, ("models", i, "name"))] + [
            (alias, ("models", i, "aliases", j)) for j, alias in enumerate(model.aliases)
        ]:
            if name in seen:
                raise src.error(
                    path, f"duplicate model name '{name}' (first at models[{seen[name]}])"
                )
            seen[name] = i
        for j, dep in enumerate(model.deployments):
            if dep.provider not in providers:
                raise src.error(
                    ("models", i, "deployments", j, "provider"),
                    f"no provider named '{dep.provider}' under providers:",
                )


def _check_health(health: HealthConfig, providers: dict, src: Source) -> None:
    for j, name in enumerate(health.checks.providers if health.checks else []):
        at = ("health", "checks", "providers", j)
        if name not in providers:
            raise src.error(at, f"no provider named '{name}' under providers:")
        try:
            check_url(providers[name], name)
        except ValueError as exc:
            raise src.error(at, str(exc)) from None


def _pipeline(raw: Any, src: Source) -> list[PluginSpec]:
    if not isinstance(raw, list):
        raise src.error(("pipeline",), "must be a list of plugins")
    specs = []
    for i, entry in enumerate(raw):
        path: tuple = ("pipeline", i)
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise src.error(path, "each entry is `- name: {settings}` with one plugin name")
        ((name, settings),) = entry.items()
        try:
            cls = plugin_class(name)
        except ImportError as exc:
            raise src.error(path + (name,), str(exc)) from None
        config_cls = getattr(cls, "Config", None)
        if config_cls is None:
            if settings not in (None, {}):
                raise src.error(path + (name,), "this plugin takes no settings")
            config = None
        else:
            config = build(config_cls, settings, path + (name,), src)
        specs.append(PluginSpec(name, config, src.where(path + (name,))))
    return specs
