"""auth: who is calling, and which models they may use.

API keys from the config (the key itself, usually `${ENV}`, or its SHA-256
digest) and JWT bearer tokens (HS* secret, or RS*/ES*/PS* public keys from a
PEM file or a JWKS file or URL). Keys are looked up by digest and compared in
constant time; no key, token or digest is ever logged or echoed. The admin key
(`server.admin_key`) guards `/admin/*` and is not a client key.

    pipeline:
      - auth:
          keys:
            - {name: team-a, key: "${TEAM_A_KEY}", team: a, models: ["gpt-4o*"]}
            - {name: ci, sha256: 9f86d0..., expires: "2027-01-01"}
          jwt:
            algorithms: [RS256]
            jwks_url: https://login.example.com/.well-known/jwks.json
            issuer: https://login.example.com/
            audience: meshgate
            claims: {team: org, models: llm_models}
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from plugins._jwt import JWTConfig, JWTVerifier
from proxy.admin import bearer_token
from proxy.context import PluginContext
from proxy.errors import AuthenticationFailed
from proxy.pipeline import MODEL_CALLS, Call, Identity, Next, Reply, permitted, refuse


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyConfig:
    name: str
    key: str | None = None
    sha256: str | None = None  # hex digest of the key, instead of the key
    team: str | None = None
    user: str | None = None
    models: list[str] = field(default_factory=lambda: ["*"])
    expires: str | None = None  # ISO date or datetime; UTC unless it says otherwise
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            # `jwt:<sub>` names token subjects in counters and spend.
            raise ValueError(f"key name {self.name!r} must be non-empty and without ':'")
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key '{self.name}' needs exactly one of `key` or `sha256`")
        if self.key is not None and len(self.key) < 8:
            raise ValueError(f"key '{self.name}' is shorter than 8 characters")
        if self.sha256 is not None:
            try:
                ok = len(bytes.fromhex(self.sha256)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"key '{self.name}': sha256 must be 64 hex digits")
        if self.expires is not None:
            expiry_of(self.expires)

    def digest(self) -> bytes:
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None  # exactly one of them, checked above
        return hashlib.sha256(self.key.encode()).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    keys: list[KeyConfig] = field(default_factory=list)
    jwt: JWTConfig | None = None

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        if not self.keys and self.jwt is None:
            raise ValueError("auth needs `keys`, `jwt`, or both")


@dataclass(slots=True)
class _Key:
    identity: Identity
    expires: float | None


class Auth:
    Config = AuthConfig

    def __init__(self, config: AuthConfig, context: PluginContext) -> None:
        self.keys: dict[bytes, _Key] = {}
        for k in config.keys:
            identity = Identity(k.name, k.team, k.user, tuple(k.models), dict(k.metadata))
            expires = expiry_of(k.expires) if k.expires else None
            self.keys[k.digest()] = _Key(identity, expires)
        if len(self.keys) != len(config.keys):
            raise ValueError("two auth keys have the same value")
        # Keys already presented, by their BLAKE2b digest: Python's own BLAKE2b cost a
        # busy worker less per call than OpenSSL's SHA-256 in an in-process profile,
        # though no benchmark under load/ resolves the difference. Only keys that
        # matched are added, so it holds at most one entry per configured key.
        self.seen: dict[bytes, _Key] = {}
        self.jwt = JWTVerifier(config.jwt) if config.jwt is not None else None

    async def start(self) -> None:
        if self.jwt is not None:
            await self.jwt.start()

    async def close(self) -> None:
        if self.jwt is not None:
            await self.jwt.close()

    def ready(self) -> bool:
        return self.jwt is None or self.jwt.ready()

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        identity = call.identity  # set only by a call made inside the gateway
        if identity is None:
            call.identity = identity = await self.authenticate(call.headers)
        # Refused early here; the gateway checks again whatever model ends up serving.
        if call.endpoint in MODEL_CALLS and call.model is not None:
            if not permitted(identity, call.model):
                raise refuse(identity, call.model)
        return await call_next(call)

    async def authenticate(self, headers) -> Identity:
        token = bearer_token(headers)
        if not token:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
            )
        # Looking keys up by a digest keeps the comparison's timing independent of
        # the secret: what a timing probe could learn is the digest.
        raw = token.encode()
        seen = hashlib.blake2b(raw, digest_size=32).digest()
        found = self.seen.get(seen)
        if found is None:
            found = self.keys.get(hashlib.sha256(raw).digest())
            if found is not None:
                self.seen[seen] = found
        if found is not None:
            if found.expires is not None and time.time() >= found.expires:
                raise AuthenticationFailed("The API key has expired.", code="expired_api_key")
            return found.identity
        if self.jwt is not None and token.count(".") == 2:
            return await self.jwt.verify(token)
        raise AuthenticationFailed("Incorrect API key provided.")


def expiry_of(text: str) -> float:
    """Seconds since the epoch of an ISO date (end of that day, UTC) or datetime."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 86400
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expires must be an ISO date or datetime, not {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
