"""The auth plugin end to end: keys, JWTs from a JWKS served over HTTP, admin key."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import threading
import time
from pathlib import Path

import httpx
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import AuthenticationFailed
from tests.conftest import (
    HOSTILE_WAYS,
    JSON_VALUES,
    MESSAGES,
    LogLines,
    free_port,
    start_gateway,
)

ADMIN = "admin-key-0123456789abcdef"
PLAIN = "sk-team-a-0123456789"
HASHED = "sk-hashed-0123456789"


class JWKSServer:
    """Serves a JWKS over HTTP on loopback; its keys can change and it can go down."""

    def __init__(self) -> None:
        self.jwks: dict = {"keys": []}
        self.up = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if not server.up:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = orjson.dumps(server.jwks)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, kid: str, private_key) -> None:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.jwks = {
            "keys": [*self.jwks["keys"], {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]
        }


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys():
    return {"k1": rsa_key(), "k2": rsa_key()}


@pytest.fixture(scope="module")
def jwks(keys):
    server = JWKSServer()
    server.add("k1", keys["k1"])
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, jwks):
    tmp = tmp_path_factory.mktemp("auth")
    env = dict(os.environ, TEAM_A_KEY=PLAIN, ADMIN_KEY=ADMIN)
    server = start_gateway(tmp, f"""
server: {{host: 127.0.0.1, admin_key: "${{ADMIN_KEY}}"}}
providers:
  up: {{type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
models:
  - {{name: gpt-4o, deployments: [{{provider: up, model: gpt-4o}}]}}
  - {{name: gpt-4o-mini, deployments: [{{provider: up, model: gpt-4o-mini}}]}}
  - {{name: claude, deployments: [{{provider: up, model: claude}}]}}
pipeline:
  - auth:
      keys:
        - {{name: team-a, key: "${{TEAM_A_KEY}}", team: a, user: ann, models: ["gpt-4o*"]}}
        - {{name: hashed, sha256: {hashlib.sha256(HASHED.encode()).hexdigest()}}}
        - {{name: old, key: sk-expired-0123456789, expires: 2020-01-01}}
      jwt:
        algorithms: [RS256]
        jwks_url: {jwks.url}
        jwks_refresh_s: 1
        issuer: https://issuer.test/
        audience: meshgate
        claims: {{team: org, models: llm_models}}
  - quotas: {{}}
""", env=env)  # fmt: skip
    yield server
    server.stop()


_opened: list[openai.OpenAI] = []


def client(gateway, key):
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    _opened.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _opened:
        _opened.pop().close()


def token(private_key, kid="k1", **claims):
    now = int(time.time())
    payload = {"sub": "svc-1", "iss": "https://issuer.test/", "aud": "meshgate",
               "iat": now, "exp": now + 300, "org": "research", **claims}  # fmt: skip
    return jwt.encode(payload, private_key, algorithm="RS256", headers={"kid": kid})


def test_missing_and_wrong_keys_are_401(gateway):
    r = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, "sk-wrong-key").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"


def test_key_in_every_header_the_sdks_use(gateway):
    body = {"model": "gpt-4o", "messages": MESSAGES}
    for headers in ({"authorization": f"Bearer {PLAIN}"}, {"api-key": PLAIN}, {"x-api-key": PLAIN}):
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, headers


def test_hashed_key_and_expired_key(gateway):
    assert client(gateway, HASHED).chat.completions.create(model="claude", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, "sk-expired-0123456789").chat.completions.create(
            model="claude", messages=MESSAGES
        )
    assert info.value.code == "expired_api_key"


def test_allowed_models_restrict_calls_and_listing(gateway):
    c = client(gateway, PLAIN)
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="claude", messages=MESSAGES)
    assert info.value.code == "model_not_allowed"
    assert [m.id for m in c.models.list()] == ["gpt-4o", "gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("claude")
    assert [m.id for m in client(gateway, HASHED).models.list()] == [
        "gpt-4o",
        "gpt-4o-mini",
        "claude",
    ]


def test_jwt_from_jwks_maps_claims(gateway, keys):
    c = client(gateway, token(keys["k1"], llm_models=["claude"]))
    assert c.chat.completions.create(model="claude", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    lines = [x for x in gateway.access_lines() if x["key"] == "svc-1"]
    assert lines and lines[-1]["team"] == "research"


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"aud": "someone-else"}, "invalid_api_key"),
        ({"iss": "https://evil.test/"}, "invalid_api_key"),
    ],
)
def test_bad_jwt_claims(gateway, keys, claims, code):
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, token(keys["k1"], **claims)).models.list()
    assert info.value.code == code


def test_alg_none_and_hmac_confusion_rejected(gateway, keys):
    now = int(time.time())
    claims = {"sub": "x", "iss": "https://issuer.test/", "aud": "meshgate", "exp": now + 60}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})
    public_pem = (
        keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b'{"alg":"HS256","kid":"k1","typ":"JWT"}'
    import base64
    import hmac as hmac_mod

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(header) + b"." + b64(orjson.dumps(claims))
    forged = signing_input + b"." + b64(hmac_mod.new(public_pem, signing_input, "sha256").digest())
    for bad in (unsigned, forged.decode()):
        with pytest.raises(openai.AuthenticationError):
            client(gateway, bad).models.list()


def test_jwks_rotation_and_outage(gateway, jwks, keys):
    new = token(keys["k2"], kid="k2")
    with pytest.raises(openai.AuthenticationError):
        client(gateway, new).models.list()  # not published yet
    jwks.add("k2", keys["k2"])
    for _ in range(20):  # the JWKS is refreshed every second
        try:
            client(gateway, new).models.list()
            break
        except openai.AuthenticationError:
            time.sleep(0.3)
    else:
        pytest.fail("the new key was never picked up")
    jwks.up = False
    try:
        deadline = time.monotonic() + 30
        while "cannot refresh the JWKS" not in gateway.output():  # a refresh failed
            assert time.monotonic() < deadline, "no refresh failed"
            time.sleep(0.05)
        assert client(gateway, token(keys["k1"])).models.list()  # cached keys still work
    finally:
        jwks.up = True


def test_admin_key_guards_admin_endpoints(gateway):
    assert httpx.get(gateway.url + "/admin/spend").status_code == 401
    r = httpx.get(gateway.url + "/admin/spend", headers={"authorization": f"Bearer {PLAIN}"})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "This endpoint needs the admin key."
    ok = httpx.get(gateway.url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200 and set(ok.json()) == {"day", "month"}
    # the admin key is not a client key
    with pytest.raises(openai.AuthenticationError):
        client(gateway, ADMIN).models.list()


def test_metrics_are_not_served_to_clients(gateway, keys):
    """/metrics names every key and team with its spend: a client's credential, valid
    for model calls, does not open it; the admin key does (no metrics_key is set)."""
    callers = {"nobody": {}, "a client key": {"authorization": f"Bearer {PLAIN}"},
               "a client key as x-api-key": {"x-api-key": PLAIN},
               "a token": {"authorization": f"Bearer {token(keys['k1'])}"},
               "the admin key, not as a bearer": {"authorization": f"Basic {ADMIN}"}}  # fmt: skip
    for who, headers in callers.items():
        r = httpx.get(gateway.url + "/metrics", headers=headers)
        assert r.status_code == 401, who
        assert r.json()["error"]["type"] == "authentication_error", who
        assert "meshgate_" not in r.text and "team-a" not in r.text, who
    ok = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200 and "meshgate_requests_total" in ok.text


def test_no_secret_in_logs(gateway, keys):
    out = gateway.output()
    for secret in (
        PLAIN,
        HASHED,
        ADMIN,
        "sk-expired-0123456789",
        hashlib.sha256(HASHED.encode()).hexdigest(),
    ):
        assert secret not in out


def test_jwt_hs256_and_es256_pem(tmp_path):
    """The other key sources, on the verifier directly."""
    import asyncio

    from plugins._jwt import JWTConfig, JWTVerifier

    secret = "s" * 40
    verifier = JWTVerifier(JWTConfig(algorithms=["HS256"], secret=secret))
    good = jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60, "team": "t"}, secret, algorithm="HS256"
    )
    identity = asyncio.run(verifier.verify(good))
    assert (identity.name, identity.team, identity.models) == ("a", "t", ("*",))

    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "ec.pem"
    pem.write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    verifier = JWTVerifier(JWTConfig(algorithms=["ES256"], public_key_file=str(pem)))
    es = jwt.encode(
        {"sub": "b", "exp": int(time.time()) + 60, "models": "gpt-4o claude"},
        ec_key,
        algorithm="ES256",
    )
    assert asyncio.run(verifier.verify(es)).models == ("gpt-4o", "claude")
    with pytest.raises(AuthenticationFailed):
        asyncio.run(verifier.verify(good))  # HS256 is not on this verifier's list
    with pytest.raises(ValueError):
        JWTConfig(algorithms=["HS256", "RS256"], secret=secret)
    with pytest.raises(ValueError):
        JWTConfig(algorithms=["none"], secret=secret)


def test_jwks_file_and_not_before(tmp_path):
    import asyncio

    from plugins._jwt import JWTConfig, JWTVerifier

    key = rsa_key()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps({"keys": [{**jwk, "kid": "f1"}]}))
    verifier = JWTVerifier(JWTConfig(algorithms=["RS256"], jwks_file=str(path), leeway_s=0))
    now = int(time.time())
    good = jwt.encode({"sub": "f", "exp": now + 60}, key, algorithm="RS256", headers={"kid": "f1"})
    assert asyncio.run(verifier.verify(good)).name == "f"
    early = jwt.encode({"sub": "f", "exp": now + 600, "nbf": now + 300}, key, algorithm="RS256",
                       headers={"kid": "f1"})  # fmt: skip
    with pytest.raises(AuthenticationFailed):
        asyncio.run(verifier.verify(early))
    no_exp = jwt.encode({"sub": "f"}, key, algorithm="RS256", headers={"kid": "f1"})
    with pytest.raises(AuthenticationFailed):
        asyncio.run(verifier.verify(no_exp))


@functools.cache
def _jwks() -> tuple:
    """An RSA key, and a JWKS file of its public half under kid f1."""
    import tempfile

    key = rsa_key()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    path = Path(tempfile.mkdtemp()) / "jwks.json"
    path.write_bytes(orjson.dumps({"keys": [{**jwk, "kid": "f1"}]}))
    return key, str(path)


def _b64(value) -> str:
    import base64

    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()


HEADER_VALUES = st.one_of(JSON_VALUES, st.sampled_from(["HS256", "RS256", "none", "f1", "JWT"]))


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u", "b64"]),
                           HEADER_VALUES, max_size=5),
    claims=st.dictionaries(st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "team",
                                            "models", "user"]), JSON_VALUES, max_size=6),
    signed=st.booleans(),
)  # fmt: skip
def test_any_token_is_an_identity_or_a_401_never_a_crash(header, claims, signed):
    """Whatever a token's header and claims hold (a kid that is a list, an exp that
    is a string, crit and b64 extensions, jku pointing elsewhere): the verifier
    answers with an identity or AuthenticationFailed, nothing else."""
    import asyncio

    from plugins._jwt import JWTConfig, JWTVerifier

    secret, (private, jwks) = "s" * 40, _jwks()
    for keyed, key, alg in (
        (JWTConfig(algorithms=["HS256"], secret=secret), secret, "HS256"),
        (JWTConfig(algorithms=["HS256"], secret=secret, audience="a", issuer="i"), secret, "HS256"),
        (JWTConfig(algorithms=["RS256"], jwks_file=jwks), private, "RS256"),
    ):
        verifier = JWTVerifier(keyed)
        token = f"{_b64({'alg': alg, **header})}.{_b64(claims)}.c2ln"
        if signed:
            with contextlib.suppress(TypeError, ValueError, NotImplementedError, jwt.PyJWTError):
                token = jwt.encode(claims, key, algorithm=alg, headers=header)
        try:
            identity = asyncio.run(verifier.verify(token))
        except AuthenticationFailed as exc:
            assert exc.status == 401
        else:
            assert isinstance(identity.name, str) and identity.name


@pytest.mark.parametrize("way", HOSTILE_WAYS)
def test_a_jwks_host_that_answers_slowly_or_without_end_holds_nothing(hostile_http, monkeypatch,
                                                                       way):  # fmt: skip
    """The gateway's start waits on the first fetch, and a token with an unknown `kid`
    on another: each ends by its deadline or at the size limit, keeping the keys known."""
    import asyncio

    from plugins import _jwt

    monkeypatch.setattr(_jwt, "JWKS_FETCH_S", 0.5)
    monkeypatch.setattr(_jwt, "JWKS_MAX_BYTES", 64 * 1024)
    why = "the answer is larger than 65536 bytes" if way == "endless" else "no answer within 0.5 s"
    verifier = _jwt.JWTVerifier(
        _jwt.JWTConfig(algorithms=["RS256"], jwks_url=hostile_http(way) + "/jwks.json")
    )

    async def run() -> None:
        with LogLines("meshgate.auth") as said:
            await asyncio.wait_for(verifier.start(), 30)  # a hang fails here, not the run
            assert f"cannot refresh the JWKS, keeping 0 known keys: {why}" in said.text
            assert not verifier.ready()
            verifier._last_fetch -= 60  # due for the refresh an unknown kid asks for
            with pytest.raises(AuthenticationFailed, match="unknown key"):
                await asyncio.wait_for(verifier.verify(token(rsa_key(), kid="new")), 30)
            assert said.text.count("cannot refresh the JWKS") == 2
        await verifier.close()

    asyncio.run(run())


@pytest.mark.parametrize("answer", [404, 500, 302, 200, "refused"])
def test_a_failed_jwks_fetch_is_logged_without_what_the_url_holds(answer):
    """httpx quotes the URL in its errors; a JWKS URL can carry a credential in its
    userinfo or query. 200 answers a document that is not a JWKS."""
    import asyncio

    from plugins._jwt import JWTConfig, JWTVerifier

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answer if isinstance(answer, int) else 500)
            self.send_header("location", "http://127.0.0.1:1/elsewhere?token=sk-LOCATION-1")
            self.end_headers()
            self.wfile.write(b"<html>sk-BODY-0123456789</html>")

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = free_port() if answer == "refused" else httpd.server_address[1]
    url = f"http://jwks-user:sk-PASSWORD-0123@127.0.0.1:{port}/keys?token=sk-QUERY-0123456789"
    verifier = JWTVerifier(JWTConfig(algorithms=["RS256"], jwks_url=url))
    try:
        with LogLines("meshgate.auth") as said:
            asyncio.run(verifier.start())
    finally:
        asyncio.run(verifier.close())
        httpd.shutdown()
        httpd.server_close()
    (line,) = said.lines
    assert line.startswith("cannot refresh the JWKS, keeping 0 known keys: ")
    for secret in ("sk-PASSWORD", "sk-QUERY", "sk-LOCATION", "sk-BODY", "jwks-user", "/keys"):
        assert secret not in line
    if isinstance(answer, int) and answer >= 300:
        assert line.endswith(f"HTTP {answer}")
