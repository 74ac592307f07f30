"""A sandbox for code found in answers: one process per run, contained.

Two levels, chosen at start and logged:

- `namespaces`: bubblewrap with every namespace unshared (user, pid, network,
  mount, ipc, uts, cgroup), only `/usr` mounted and read-only, a read-only
  root, an empty size-limited tmpfs as working directory, a cleared
  environment, uid 65534 inside; run by an unprivileged host uid of its own when
  the gateway is root, so process limits count per run.
- `rlimits`: where namespaces are not allowed (Docker's default seccomp profile
  blocks them): the same init process, limits and seccomp filter, as a uid of
  its own, in a fresh private directory. The file system is not hidden: it is
  protected only by that uid's permissions. Refused when the gateway cannot
  switch uid, since the code would then run as the gateway's own user.

In both, the program runs under rlimits (address space, CPU time, processes,
file size, open files) and a seccomp filter that refuses sockets, ptrace,
mount, namespaces, setsid and other kernel surfaces, with a wall-clock kill of
its whole process group; see sandbox_init.py for the process that enforces
them. Where neither level is possible (no bubblewrap and not root, or no
libseccomp), code is never run: every code check reports `not_run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

log = logging.getLogger("meshgate.verify.sandbox")

INIT_SOURCE = (Path(__file__).parent / "sandbox_init.py").read_text
MIB = 1024 * 1024

# Refused with EPERM inside the sandbox (a denylist over an allow-by-default
# filter, as Docker's profile is; the architecture check kills other ABIs).
DENIED_SYSCALLS = (
    "socket", "socketpair", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns", "setsid",
    "setpgid", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "name_to_handle_at", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "sethostname", "setdomainname", "iopl", "ioperm", "fanotify_init",
    "lookup_dcookie", "syslog", "vhangup",
)  # fmt: skip
# clone() flags that make namespaces: refused, so no nested namespace is made.
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LanguageConfig:
    """A language to run, besides Python and bash: `command` (an interpreter under
    /usr or `binds`) is run on the program written to `file` in the working dir."""

    command: list[str]
    file: str
    aliases: list[str] = field(default_factory=list)  # fence labels, besides its name

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("a language needs a command")
        if not self.file or "/" in self.file or self.file.startswith("."):
            raise ValueError("file is a plain file name, e.g. main.rb")


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    isolation: Literal["auto", "namespaces", "rlimits"] = "auto"
    # The interpreter inside; only /usr (and `binds`) is mounted. Default: the first
    # of /usr/bin/python3 (Debian's) and /usr/local/bin/python3 (the python images').
    python: str | None = None
    binds: list[str] = field(default_factory=list)  # more read-only paths, e.g. a venv
    wall_s: float = 5.0  # the whole run, then its process group is killed
    cpu_s: int = 3
    memory_bytes: int = 512 * MIB  # address space
    processes: int = 32
    file_bytes: int = 16 * MIB  # the largest file it may write
    open_files: int = 64
    tmpfs_bytes: int = 64 * MIB  # the working directory (namespaces only)
    max_output_bytes: int = 64 * 1024  # stdout and stderr kept, each
    max_concurrent: int = 8  # more runs wait for a slot,
    slot_wait_s: float = 10.0  # this long at most: then the code is not run, and says so
    uid_base: int = 200_000  # a root gateway runs slot i as uid uid_base + i
    languages: dict[str, LanguageConfig] = field(default_factory=dict)  # more than LANGUAGES

    def __post_init__(self) -> None:
        numbers = (
            self.wall_s, self.cpu_s, self.memory_bytes, self.processes, self.file_bytes,
            self.open_files, self.tmpfs_bytes, self.max_output_bytes, self.max_concurrent,
            self.slot_wait_s,
        )  # fmt: skip
        if any(n <= 0 for n in numbers):
            raise ValueError("sandbox limits must be positive")
        if not 1000 <= self.uid_base < 2**31 - 1024:
            raise ValueError("uid_base must leave room for max_concurrent uids below 2^31")


@dataclass(frozen=True, slots=True)
class Language:
    """How to run one language: Python runs in the sandbox's own interpreter (no
    second start); others are a command on the program's file."""

    name: str
    aliases: tuple[str, ...]
    file: str
    command: tuple[str, ...] = ()  # `{file}` is replaced by the program's path


LANGUAGES = {
    "python": Language("python", ("python", "py", "python3"), "main.py"),
    "bash": Language("bash", ("bash", "sh", "shell"), "main.sh", ("/usr/bin/bash", "{file}")),
}


@dataclass(slots=True)
class RunResult:
    """How one run went. `outcome`: passed, failed, timeout, memory, killed,
    output_limit or not_run (no sandbox here; `detail` says why)."""

    outcome: str
    exit_code: int | None = None
    duration_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    detail: str = ""

    def excerpt(self, limit: int = 2000) -> str:
        text = self.stderr.strip() or self.detail
        return text if len(text) <= limit else "..." + text[-limit:]

    def summary(self) -> dict:
        return {"outcome": self.outcome, "exit_code": self.exit_code,
                "duration_ms": round(self.duration_s * 1000, 1), "stderr": self.excerpt(),
                **({"detail": self.detail} if self.detail else {})}  # fmt: skip


class Sandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.level: str = "none"
        self.reason = "not started"
        self._bpf = b""
        self._init = ""
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(config.max_concurrent):
            self._slots.put_nowait(slot)
        self._as_root = os.geteuid() == 0
        self.python = config.python or next(
            (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
            "/usr/bin/python3",
        )
        self._threads = ThreadPoolExecutor(config.max_concurrent, "meshgate-sandbox")
        self.languages = dict(LANGUAGES)
        for name, lang in config.languages.items():
            aliases = (name.lower(), *(a.lower() for a in lang.aliases))
            # /usr/bin/awk and the like are links through /etc/alternatives, which is
            # not mounted: run what they point at.
            command = (os.path.realpath(lang.command[0]), *lang.command[1:])
            self.languages[name] = Language(name, aliases, lang.file, command)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def start(self) -> None:
        """Find the strongest isolation this host allows, prove it with a run, log it."""
        self._init = INIT_SOURCE()
        try:
            self._bpf = seccomp_filter()
        except (ImportError, OSError) as exc:
            return self._refuse(f"no seccomp filter can be built (libseccomp, pyseccomp): {exc}")
        if not os.access(self.python, os.X_OK):
            return self._refuse(f"no interpreter at sandbox.python ({self.python})")
        wanted = self.config.isolation
        failures: list[str] = []
        for level in ("namespaces", "rlimits"):
            if wanted not in ("auto", level):
                continue
            problem = self._unavailable(level) or await self._probe(level)
            if problem is None:
                self.level, self.reason = level, ""
                if level == "namespaces":
                    log.info("verify: code runs in bubblewrap namespaces + seccomp + rlimits")
                else:
                    log.warning(
                        "verify: code runs with rlimits + seccomp only, no namespaces (%s); "
                        "the file system is protected by a separate uid alone",
                        "; ".join(failures) or "as configured",
                    )
                return None
            failures.append(f"{level}: {problem}")
        return self._refuse("; ".join(failures))

    def _refuse(self, reason: str) -> None:
        self.level, self.reason = "none", reason
        log.error("verify: code will NOT be run (no sandbox is possible here): %s", reason)

    def _unavailable(self, level: str) -> str | None:
        if level == "namespaces" and shutil.which("bwrap") is None:
            return "bubblewrap (bwrap) is not installed"
        if level == "rlimits" and not self._as_root:
            return "the gateway cannot switch to a uid of its own for the code (not root)"
        return None

    async def _probe(self, level: str) -> str | None:
        result = await self._run(level, LANGUAGES["python"], "print('ok')")
        if result.outcome == "passed" and result.stdout.strip() == "ok":
            return None
        return result.excerpt(300) or result.outcome

    @property
    def available(self) -> bool:
        return self.level != "none"

    async def run(self, language: Language, program: str) -> RunResult:
        if not self.available:
            return RunResult("not_run", detail=f"no sandbox on this host: {self.reason}")
        return await self._run(self.level, language, program)

    async def _run(self, level: str, language: Language, program: str) -> RunResult:
        try:
            async with asyncio.timeout(self.config.slot_wait_s):
                slot = await self._slots.get()
        except TimeoutError:
            why = f"all {self.config.max_concurrent} sandbox slots stayed busy for "
            return RunResult("not_run", detail=why + f"{self.config.slot_wait_s:g} s")
        workdir = None
        try:
            uid = self.config.uid_base + slot if self._as_root else None
            if level == "namespaces":
                argv = self._bwrap_argv()
                job_dir, job_uid = "/work", None
            else:
                workdir = tempfile.mkdtemp(prefix="meshgate-sandbox-")
                if uid is not None:
                    os.chown(workdir, uid, uid)
                argv = [self.python, "-I", "-B", "-c", self._init]
                job_dir, job_uid = workdir, uid
            job = self._job(language, program, job_dir, job_uid)
            return await self._execute(argv, job, level, uid, workdir)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            self._slots.put_nowait(slot)

    def _job(self, language: Language, program: str, workdir: str, uid: int | None) -> bytes:
        c = self.config
        path = f"{workdir}/{language.file}"
        return orjson.dumps({
            "program": program, "file": language.file, "workdir": workdir,
            "inline": not language.command,
            "command": [part.replace("{file}", path) for part in language.command],
            "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            "uid": uid, "gid": uid, "wall_s": c.wall_s, "max_output_bytes": c.max_output_bytes,
            "bpf": self._bpf.hex(),
            "limits": {"address_space_bytes": c.memory_bytes, "cpu_s": c.cpu_s,
                       # the uid's processes include bubblewrap's and the init's own
                       "processes": c.processes + 4, "file_bytes": c.file_bytes,
                       "open_files": c.open_files},
        })  # fmt: skip

    def _bwrap_argv(self) -> list[str]:
        c = self.config
        argv = ["bwrap", "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr"]  # fmt: skip
        for top in ("bin", "lib", "lib64", "sbin"):
            host = Path("/" + top)
            if host.is_symlink():
                argv += ["--symlink", os.readlink(host), "/" + top]
            elif host.exists():
                argv += ["--ro-bind", str(host), "/" + top]
        for path in c.binds:
            argv += ["--ro-bind", path, path]
        argv += [
            "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(c.tmpfs_bytes), "--tmpfs", "/work", "--chdir", "/work",
            "--remount-ro", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work",
            "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox",
            "--uid", "65534", "--gid", "65534",
            self.python, "-I", "-B", "-c", self._init,
        ]  # fmt: skip
        return argv

    async def _execute(
        self, argv: list[str], job: bytes, level: str, uid: int | None, workdir: str | None
    ) -> RunResult:
        started = time.perf_counter()
        # bubblewrap itself runs as the run's uid; the rlimits init drops to it itself.
        # subprocess switches uid in C between fork and exec (uvloop's subprocesses
        # cannot), and a thread per run waits on it.
        host_uid = uid if level == "namespaces" else None
        switch: dict[str, Any] = {}
        if host_uid is not None:
            switch = {"user": host_uid, "group": host_uid, "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env=env, cwd=workdir or "/", **switch,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        waiting = loop.run_in_executor(self._threads, proc.communicate, job)
        try:
            # The init kills the program at wall_s; this is the backstop if it cannot.
            async with asyncio.timeout(self.config.wall_s + 3.0):
                out, err = await asyncio.shield(waiting)
        except TimeoutError:
            self._kill(proc.pid, uid)
            await waiting
            why = "the sandbox did not answer in time and was killed"
            return RunResult("timeout", duration_s=time.perf_counter() - started, detail=why)
        except asyncio.CancelledError:
            self._kill(proc.pid, uid)  # the client left: the run goes with it
            raise
        return _result(out, err, proc.returncode, time.perf_counter() - started)

    def _kill(self, pid: int, uid: int | None) -> None:
        """Kill the run's session (bubblewrap's death takes its namespace with it) and,
        when the run had a uid of its own, every process of that uid."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if uid is not None:
            for _ in range(3):
                if not _kill_uid(uid):
                    break


def _kill_uid(uid: int) -> int:
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if int(line.split()[1]) == uid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed += 1
                break
    return killed


def _result(out: bytes, err: bytes, returncode: int | None, elapsed: float) -> RunResult:
    try:
        report = orjson.loads(out.strip().splitlines()[-1]) if out.strip() else None
    except orjson.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or "error" in report:
        why = report.get("error") if isinstance(report, dict) else err.decode(errors="replace")
        detail = f"the sandbox failed (exit {returncode}): {str(why)[-500:]}"
        return RunResult("killed", duration_s=elapsed, detail=detail)
    result = RunResult(
        "failed", exit_code=report["exit_code"], duration_s=report["duration_s"],
        stdout=report["stdout"], stderr=report["stderr"],
    )  # fmt: skip
    stderr = result.stderr
    if report["timed_out"]:
        result.outcome, result.detail = "timeout", "killed at the wall-clock limit"
    elif report["signal"] == signal.SIGXCPU or report["signal"] == signal.SIGKILL:
        result.outcome, result.detail = "timeout", "killed at the CPU-time limit"
    elif report["signal"] == signal.SIGXFSZ or "File too large" in stderr[-400:]:
        result.outcome, result.detail = "output_limit", "a file passed the file-size limit"
    elif "MemoryError" in stderr[-400:]:
        result.outcome, result.detail = "memory", "the program passed the memory limit"
    elif report["signal"] is not None:
        result.outcome = "killed"
        result.detail = f"killed by signal {signal.Signals(report['signal']).name}"
    elif report["exit_code"] == 0:
        result.outcome = "passed"
    if report["output_dropped_bytes"]:
        result.detail = (result.detail + "; " if result.detail else "") + (
            f"{report['output_dropped_bytes']} bytes of output dropped"
        )
    return result


def seccomp_filter() -> bytes:
    """The BPF program the init loads for the code: compiled here, with libseccomp."""
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        with contextlib.suppress(RuntimeError, ValueError):  # unknown on this architecture
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(
            seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
        )
    # clone3 passes its flags in memory, out of a filter's reach: glibc falls back to
    # clone on ENOSYS, where the flags are checked.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as f:
        rules.export_bpf(f)
        f.seek(0)
        return f.read()
