"""JWT bearer tokens for the auth plugin: verification and key sources.

Algorithms are an explicit allow-list that cannot mix HMAC with public-key
algorithms (so a public key can never be used as an HMAC secret) and never
includes `none`. A JWKS URL is fetched at start and refreshed in the
background; a failed fetch keeps the keys already known. A fetch is bounded in
time and size as a whole (`JWKS_FETCH_S`, `JWKS_MAX_BYTES`): a key host that
answers a byte at a time, or without end, holds neither the gateway's start nor
a request that waits on a refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson

from proxy.errors import AuthenticationFailed
from proxy.pipeline import Identity
from proxy.redact import transport_reason

log = logging.getLogger("meshgate.auth")

JWKS_FETCH_S = 5.0
JWKS_MAX_BYTES = 1024 * 1024  # a JWKS is a few KB: a larger answer is not one

HMAC = {"HS256", "HS384", "HS512"}
PUBLIC = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimsConfig:
    name: str = "sub"  # the identity's name (shown in logs and spend)
    team: str | None = "team"
    user: str | None = "sub"
    models: str | None = "models"  # a list, or a space-separated string, of model globs


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTConfig:
    algorithms: list[str]
    secret: str | None = None  # HS*
    public_key_file: str | None = None  # PEM, RS*/ES*/PS*
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh_s: float = 300.0
    issuer: str | None = None
    audience: str | None = None
    leeway_s: float = 30.0
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    default_models: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self) -> None:
        algs = set(self.algorithms)
        if not algs or not algs <= HMAC | PUBLIC:
            raise ValueError(f"jwt.algorithms must be among {sorted(HMAC | PUBLIC)}")
        if algs & HMAC and algs & PUBLIC:
            raise ValueError("jwt.algorithms cannot mix HMAC (HS*) and public-key algorithms")
        sources = [self.public_key_file, self.jwks_file, self.jwks_url]
        if algs <= HMAC:
            if not self.secret or any(sources):
                raise ValueError("HS* algorithms need `secret` and no public keys")
            if len(self.secret) < 32:
                raise ValueError("jwt.secret must be at least 32 characters")
        elif self.secret or sum(1 for s in sources if s) != 1:
            raise ValueError(
                "public-key algorithms need exactly one of public_key_file, jwks_file, jwks_url"
            )


class JWTVerifier:
    def __init__(self, config: JWTConfig) -> None:
        self.config = config
        self.algorithms = list(config.algorithms)
        self.keys: dict[str | None, Any] = {}  # kid -> key; None for a single PEM key
        self._client: httpx.AsyncClient | None = None
        self._refresher: asyncio.Task | None = None
        self._last_fetch = 0.0
        if config.secret:
            self.keys[None] = config.secret
        elif config.public_key_file:
            self.keys[None] = Path(config.public_key_file).read_text()
        elif config.jwks_file:
            self.keys = parse_jwks(Path(config.jwks_file).read_bytes())

    async def start(self) -> None:
        if self.config.jwks_url:
            self._client = httpx.AsyncClient(timeout=JWKS_FETCH_S)
            await self.refresh()
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._client is not None:
            await self._client.aclose()

    def ready(self) -> bool:
        return bool(self.keys)

    async def refresh(self) -> None:
        """Fetch the JWKS; on failure keep the keys already known."""
        self._last_fetch = time.monotonic()
        try:
            self.keys = parse_jwks(await self._fetch())
            return
        except TimeoutError:
            reason = f"no answer within {JWKS_FETCH_S:g} s"
        except httpx.HTTPStatusError as exc:
            reason = f"HTTP {exc.response.status_code}"
        except httpx.HTTPError as exc:  # httpx quotes the URL, which may hold a credential
            reason = transport_reason(str(exc) or type(exc).__name__)
        except ValueError as exc:
            reason = str(exc)
        log.warning("cannot refresh the JWKS, keeping %d known keys: %s", len(self.keys), reason)

    async def _fetch(self) -> bytes:
        assert self._client is not None and self.config.jwks_url is not None
        body = bytearray()
        async with asyncio.timeout(JWKS_FETCH_S):
            async with self._client.stream("GET", self.config.jwks_url) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"the answer is larger than {JWKS_MAX_BYTES} bytes")
        return bytes(body)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.jwks_refresh_s)
            await self.refresh()

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("Incorrect API key provided.") from None
        if header.get("alg") not in self.algorithms:
            raise AuthenticationFailed("The token's algorithm is not accepted.")
        kid = header.get("kid") if None not in self.keys else None
        key = self.keys.get(kid)
        if key is None and self.config.jwks_url and time.monotonic() - self._last_fetch > 30:
            await self.refresh()  # a new signing key may have been published
            key = self.keys.get(kid)
        if key is None:
            raise AuthenticationFailed("The token was signed by an unknown key.")
        c = self.config
        try:
            claims = jwt.decode(
                token, key, algorithms=self.algorithms, audience=c.audience, issuer=c.issuer,
                leeway=c.leeway_s,
                options={"require": ["exp"], "verify_aud": c.audience is not None},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("The token has expired.", code="token_expired") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed(f"Invalid token: {exc}.") from None
        return self.identity(claims)

    def identity(self, claims: dict) -> Identity:
        names = self.config.claims
        name = claims.get(names.name)
        if not isinstance(name, str) or not name:
            raise AuthenticationFailed(f"The token has no `{names.name}` claim.")
        models = claims.get(names.models) if names.models else None
        if isinstance(models, str):
            models = models.split()
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            models = self.config.default_models
        return Identity(
            name=name,
            team=_str(claims.get(names.team)) if names.team else None,
            user=_str(claims.get(names.user)) if names.user else None,
            models=tuple(models),
            kind="jwt",
        )


def parse_jwks(raw: bytes) -> dict[str | None, Any]:
    try:
        jwks = jwt.PyJWKSet.from_dict(orjson.loads(raw))
    except (orjson.JSONDecodeError, jwt.PyJWTError) as exc:
        raise ValueError(f"not a usable JWKS: {exc}") from None
    return {k.key_id: k.key for k in jwks.keys}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
