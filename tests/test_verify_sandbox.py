"""plugins/verify/sandbox.py: both isolation levels contain the same attacks, and a
host with no sandbox runs nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

from plugins.verify.sandbox import LANGUAGES, Sandbox, SandboxConfig

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
def test_the_level_in_use_is_said_at_start(caplog):
    async def start(isolation: str) -> None:
        box = Sandbox(SandboxConfig(isolation=isolation))
        await box.start()
        box.close()

    with caplog.at_level("INFO", logger="meshgate.verify.sandbox"):
        asyncio.run(start("rlimits"))
    assert "rlimits + seccomp only, no namespaces" in caplog.text
    if shutil.which("bwrap"):
        caplog.clear()
        with caplog.at_level("INFO", logger="meshgate.verify.sandbox"):
            asyncio.run(start("auto"))
        assert "bubblewrap namespaces + seccomp + rlimits" in caplog.text


def test_without_any_sandbox_code_is_never_run(tmp_path, caplog):
    async def start() -> Sandbox:
        box = Sandbox(SandboxConfig(python=str(tmp_path / "no-python")))
        await box.start()
        return box

    box = asyncio.run(start())
    assert not box.available
    assert "code will NOT be run" in caplog.text
    marker = tmp_path / "ran"
    result = run(box, f"open({str(marker)!r}, 'w')")
    assert result.outcome == "not_run" and "no interpreter" in result.detail
    assert not marker.exists()
    box.close()


def leftovers(box: Sandbox, within_s: float = 10) -> list[str]:
    uids = range(box.config.uid_base, box.config.uid_base + box.config.max_concurrent)
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) in uids]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _uid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@needs_bwrap
def test_a_run_that_finds_no_free_slot_in_time_is_not_run_and_says_so():
    async def go():
        box = Sandbox(SandboxConfig(max_concurrent=1, slot_wait_s=0.2, **LIMITS))
        await box.start()
        slow = asyncio.ensure_future(box.run(PY, "import time\ntime.sleep(1)"))
        await asyncio.sleep(0.05)
        waiting = await box.run(PY, "print(1)")
        await slow
        box.close()
        return waiting

    result = asyncio.run(go())
    assert result.outcome == "not_run" and "busy" in result.detail


@needs_bwrap
def test_a_language_from_the_config_runs_like_the_built_in_ones():
    from plugins.verify.code import run_code
    from plugins.verify.sandbox import LanguageConfig

    awk = LanguageConfig(
        command=["/usr/bin/awk", "-f", "{file}"], file="main.awk", aliases=["gawk"]
    )

    async def go():
        box = Sandbox(SandboxConfig(isolation="namespaces", languages={"awk": awk}, **LIMITS))
        await box.start()
        results = [
            await run_code(box, "```awk\nBEGIN { print 6 * 7 }\n```", None),
            await run_code(box, "```bash\necho $((6 * 7))\n```", None),
        ]
        box.close()
        return results

    awk_run, bash_run = asyncio.run(go())
    assert awk_run.stdout == bash_run.stdout == "42\n"


def test_a_language_file_must_stay_in_the_working_directory():
    from plugins.verify.sandbox import LanguageConfig

    for bad in ("../x", "/etc/x", ".hidden", ""):
        with pytest.raises(ValueError):
            LanguageConfig(command=["/usr/bin/awk"], file=bad)
