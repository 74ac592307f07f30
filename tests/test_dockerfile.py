"""The Dockerfile, checked by rule (no Docker engine here, so nothing is built):
a pinned base, a non-root user, a health check, no secrets in layers, no CUDA
torch in the semantic build, lean package installs."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            out.append([])
        out[-1].append(instruction)
    return out


def test_every_base_image_is_pinned_to_a_release():
    for kind, args in instructions():
        if kind == "FROM":
            image = args.split()[0]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
                image
            )


def test_the_image_runs_as_a_user_that_is_not_root():
    final = stages()[-1]
    users = [args for kind, args in final if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert int(users[-1].split(":")[0]) >= 1000
    last_user = max(i for i, (kind, _) in enumerate(final) if kind == "USER")
    assert all(kind not in ("RUN", "COPY", "ADD") for kind, _ in final[last_user + 1 :]), (
        "nothing runs or is copied as root after the switch"
    )


def test_a_health_check_asks_the_gateway():
    checks = [args for kind, args in stages()[-1] if kind == "HEALTHCHECK"]
    assert len(checks) == 1 and "/health" in checks[0] and "--timeout" in checks[0]


def test_no_secret_is_baked_into_a_layer():
    for kind, args in instructions():
        if kind in ("ENV", "ARG"):
            for name, _, value in re.findall(r"(\w+)(=(\S+))?", args):
                assert not (SECRETISH.search(name) and value), f"{kind} {name} has a value"
        if kind in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|\.pem\b|id_rsa|secret", args, re.I), args
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored  # history (and what it once held) stays out of the context


def test_the_semantic_build_takes_torch_from_the_cpu_index_first():
    (run,) = [args for kind, args in stages()[0] if kind == "RUN"]
    torch = run.index('--index-url "${TORCH_INDEX_URL}" "${TORCH}"')
    extra = run.index('/venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"')
    assert torch < extra
    (index,) = [args for kind, args in stages()[0] if kind == "ARG" and "TORCH_INDEX_URL" in args]
    assert "download.pytorch.org/whl/cpu" in index


@pytest.mark.parametrize("kind", ["pip", "apt-get install"])
def test_installs_keep_no_caches(kind):
    runs = [args for k, args in instructions() if k == "RUN" and kind in args]
    assert runs
    for run in runs:
        if kind == "pip":
            assert all("--no-cache-dir" in part for part in run.split("pip install")[1:])
        else:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run
