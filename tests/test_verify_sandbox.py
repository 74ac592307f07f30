"""plugins/verify/sandbox.py: both isolation levels contain the same attacks, and a
host with no sandbox runs nothing."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from plugins.verify.sandbox import LANGUAGES, Sandbox, SandboxConfig
from tests.conftest import LogLines, processes_of_uids

PY = LANGUAGES["python"]
LIMITS = {"wall_s": 2.0, "cpu_s": 1, "memory_bytes": 256 * 1024 * 1024, "file_bytes": 4 << 20}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the rlimits level needs a root gateway")
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed"
)
LEVELS = [
    pytest.param("namespaces", marks=needs_bwrap),
    pytest.param("rlimits", marks=needs_root),
]


@pytest.fixture(scope="module", params=LEVELS)
def sandbox(request):
    async def start() -> Sandbox:
        box = Sandbox(SandboxConfig(isolation=request.param, **LIMITS))
        await box.start()
        return box

    box = asyncio.run(start())
    assert box.level == request.param, box.reason
    yield box
    box.close()


def run(box: Sandbox, source: str):
    return asyncio.run(box.run(PY, source))


CASES = {
    "prints": ("print(6 * 7)", "passed"),
    "raises": ("raise ValueError('no')", "failed"),
    "exits 3": ("raise SystemExit(3)", "failed"),
    "cpu loop": ("while True:\n    pass", "timeout"),
    "sleeps": ("import time\ntime.sleep(60)", "timeout"),
    "allocates": ("b = bytearray(2 * 1024 ** 3)", "memory"),
    "big file": (
        "with open('f', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * 1048576)",
        "output_limit",
    ),
    "socket": ("import socket\nsocket.socket()", "failed"),
    "socketpair": ("import socket\nsocket.socketpair()", "failed"),
    "ptrace": (
        "import ctypes\nassert ctypes.CDLL(None).ptrace(0, 0, 0, 0) == 0, 'ptrace refused'",
        "failed",
    ),
    "setsid": ("import os\nos.setsid()", "failed"),
    "fork bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "timeout",
    ),
    "floods stdout": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "timeout"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_program_ends_as_expected_and_leaves_nothing(sandbox, name):
    source, outcome = CASES[name]
    result = run(sandbox, source)
    assert result.outcome == outcome, (result.outcome, result.excerpt())
    if name == "prints":
        assert result.stdout == "42\n" and result.exit_code == 0
    if name == "floods stdout":
        assert len(result.stdout) <= sandbox.config.max_output_bytes
    assert leftovers(sandbox) == []


def test_the_program_sees_no_secret_of_the_gateway(sandbox):
    os.environ["MESHGATE_SANDBOX_SECRET"] = "hunter2"
    try:
        source = (
            "import os\nseen = str(os.environ)\n"
            "for p in os.listdir('/proc'):\n    if p.isdigit():\n        try:\n"
            "            seen += open(f'/proc/{p}/environ').read()\n"
            "        except OSError:\n            pass\n"
            "print('hunter2' in seen, os.getuid() != 0)"
        )
        result = run(sandbox, source)
    finally:
        del os.environ["MESHGATE_SANDBOX_SECRET"]
    assert result.stdout == "False True\n", result.excerpt()


def test_writing_outside_the_working_directory_is_refused(sandbox):
    result = run(sandbox, "open('/usr/meshgate-test', 'w')")
    assert result.outcome == "failed"
    assert "Read-only" in result.stderr or "Permission denied" in result.stderr


def test_namespaces_cannot_be_made_inside(sandbox):
    source = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "assert libc.unshare(0x10000000) != 0\nassert libc.unshare(0x40000000) != 0\n"
        "print('refused')"
    )
    assert run(sandbox, source).stdout == "refused\n"


def test_twenty_runs_at_once_all_succeed(sandbox):
    async def many():
        return await asyncio.gather(*(sandbox.run(PY, f"print({i})") for i in range(20)))

    results = asyncio.run(many())
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
    assert leftovers(sandbox) == []


@needs_root
def test_the_level_in_use_is_said_at_start():
    async def start(isolation: str) -> None:
        box = Sandbox(SandboxConfig(isolation=isolation))
        await box.start()
        box.close()

    with LogLines("meshgate.verify.sandbox") as said:
        asyncio.run(start("rlimits"))
    assert "rlimits + seccomp only, no namespaces" in said.text
    if shutil.which("bwrap"):
        with LogLines("meshgate.verify.sandbox") as said:
            asyncio.run(start("auto"))
        assert "bubblewrap namespaces + seccomp + rlimits" in said.text


def test_without_any_sandbox_code_is_never_run(tmp_path):
    async def start() -> Sandbox:
        box = Sandbox(SandboxConfig(python=str(tmp_path / "no-python")))
        await box.start()
        return box

    with LogLines("meshgate.verify.sandbox") as said:
        box = asyncio.run(start())
    assert not box.available
    assert "code will NOT be run" in said.text
    marker = tmp_path / "ran"
    result = run(box, f"open({str(marker)!r}, 'w')")
    assert result.outcome == "not_run" and "no interpreter" in result.detail
    assert not marker.exists()
    box.close()


def leftovers(box: Sandbox, within_s: float = 10) -> list[str]:
    uids = range(box.config.uid_base, box.config.uid_base + box.config.max_concurrent)
    return processes_of_uids(uids, within_s)
