"""The sandbox's first process: runs one program under limits and says how it went.

plugins/verify/sandbox.py runs this file's text as `python3 -I -B -c <text>`
(inside bubblewrap when namespaces are allowed), with the job as JSON on stdin,
and reads one JSON line back from stdout. Standard library only: it runs under
the interpreter the sandbox mounts, not the gateway's.

This process never runs the program itself. A forked child takes its own
process group, drops to the run's uid, sets the rlimits, loads the seccomp
filter (which from then on refuses setsid and setpgid, so nothing it starts can
leave that group), then runs the program. This process is a child subreaper:
whatever the program forks and abandons is re-parented here, not to the
gateway. When the program ends, or at the wall-clock deadline, the whole group
is killed and every process reaped before the answer is written, so no run
leaves a process or a zombie behind.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

RLIMITS = {
    "address_space_bytes": resource.RLIMIT_AS,
    "processes": resource.RLIMIT_NPROC,
    "file_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_seccomp(libc, program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "loading the seccomp filter failed")


def _child(job: dict, libc, out_w: int, err_w: int, parent_fds: tuple) -> None:
    status = 1
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (*parent_fds, out_w, err_w, devnull):
            os.close(fd)
        if job.get("uid") is not None:
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        for name, value in job["limits"].items():
            if name == "cpu_s":
                resource.setrlimit(resource.RLIMIT_CPU, (value, value + 1))
            else:
                resource.setrlimit(RLIMITS[name], (value, value))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _load_seccomp(libc, bytes.fromhex(job["bpf"]))
        os.environ.clear()
        os.environ.update(job["env"])
        if job["inline"]:
            sys.argv = [job["file"]]
            code = compile(job["program"], job["file"], "exec")
            exec(code, {"__name__": "__main__", "__file__": job["file"]})
            status = 0
        else:
            os.execve(job["command"][0], job["command"], job["env"])
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)  # as the interpreter itself would
    except BaseException:
        try:
            kind, error, tb = sys.exc_info()
            while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
                tb = tb.tb_next  # the program's own frames only, not this file's
            traceback.print_exception(kind, error, tb)
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(status & 0xFF)


def _reap_all(group: int, within_s: float) -> bool:
    """Kill the program's process group and reap every child (orphans come here too).
    False if some process would not go in time."""
    end = time.monotonic() + within_s
    while True:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
        except ChildProcessError:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.001)


def _run(job: dict) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.chdir(job["workdir"])
    with open(job["file"], "w", encoding="utf-8") as f:
        f.write(job["program"])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, libc, out_w, err_w, (out_r, err_r))
    os.close(out_w)
    os.close(err_w)
    deadline = started + job["wall_s"]
    cap = job["max_output_bytes"]
    captured = {out_r: bytearray(), err_r: bytearray()}
    dropped = 0
    open_fds = [out_r, err_r]
    status = None
    exited_at = 0.0
    timed_out = False
    while True:
        now = time.monotonic()
        if status is None:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status, exited_at = wait_status, now
        # Once the program has ended, what it left running may hold the pipes open:
        # it gets a moment, then is killed with the rest of the group.
        if status is not None and (not open_fds or now - exited_at > 0.05):
            break
        if now >= deadline:
            timed_out = status is None
            break
        wait = min(deadline - now, 0.05)
        if not open_fds:
            time.sleep(min(wait, 0.005))
            continue
        ready, _, _ = select.select(open_fds, [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = max(0, cap - len(captured[fd]))
            captured[fd] += chunk[:room]
            dropped += len(chunk) - len(chunk[:room])
    reaped = _reap_all(pid, 1.0)
    if status is None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = None
    elapsed = time.monotonic() - started
    result = {
        "exit_code": None,
        "signal": None,
        "timed_out": timed_out,
        "duration_s": elapsed,
        "stdout": captured[out_r].decode("utf-8", "replace"),
        "stderr": captured[err_r].decode("utf-8", "replace"),
        "output_dropped_bytes": dropped,
        "reaped": reaped,
    }
    if status is not None:
        if os.WIFEXITED(status):
            result["exit_code"] = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            result["signal"] = os.WTERMSIG(status)
    return result


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    try:
        result = _run(job)
    except Exception as exc:  # the sandbox itself failed: say so, never hang
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
