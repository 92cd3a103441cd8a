"""A process that has imported what every NeMo stage imports first, and forks a child for each stage run.

`run_stage` and `model_probe` (tests/conftest.py) start ~170 single-process stages per `make test`;
each spent ~7 s of CPU importing torch and `nemo.utils` (Lightning, torchmetrics, transformers) before
running a line of its own, a third of the suite's time on 2 cores. Each pytest-xdist worker starts
one of these instead, and every single-process run is a fork of it that runs the stage module as
`python -m` does (runpy, `__main__`, sys.argv, sys.path[0] = cwd), with the run's own cwd,
environment, stdin (/dev/null), stdout and stderr (files), and exits through the interpreter's
normal shutdown (atexit, flush). The stage's own code, its Hydra entry point and everything NeMo
imports after `nemo.utils` run in the child, in the order a fresh process runs them:
`lifecycle.start` imports torch (the input checks) and then `nemo.utils` (quiet_nemo) before any
runtime patch, so preloading exactly those two changes what no patch sees. What differs: warnings
printed while importing them go to this process's stderr, not the run's; and environment variables
that torch or Lightning read at import are this process's (stage_env(), the same for every run).

Runs with several ranks (torchrun), runs a test signals or kills, servers and sbatch jobs are
started as fresh processes, as before. NEMO_FT_TEST_PRELOAD=0 turns this off (every run a fresh
process).

Protocol: one JSON line per request on a Unix socket; the reply is {"pid": ...} when the child
starts and {"code": exit code} when it ends (negative: killed by that signal).
"""
import importlib
import json
import os
import socket
import sys

PRELOAD = ("torch", "nemo.utils")


def _child(req: dict) -> None:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
    import runpy

    if req.get("module"):
        sys.argv = [req["module"], *req["args"]]  # runpy sets argv[0] to the module's file, as -m does
        sys.path[0] = req["cwd"]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [req["script"], *req["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
        runpy.run_path(req["script"], run_name="__main__")
    sys.exit(0)  # up through serve() to the interpreter: atexit handlers and flushes, as a fresh process


def serve(path: str) -> None:
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: gone with the pytest process that started it
    for name in PRELOAD:
        importlib.import_module(name)
    # A fork copies only the calling thread. The one other thread these imports start is jemalloc's
    # background purger (pyarrow's allocator), which jemalloc's own fork handlers reset in the child.
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert sorted(threads)[:-1] == ["jemalloc_bg_thd"] * (len(threads) - 1), f"not safe to fork: threads {threads}"
    import gc

    gc.freeze()  # what the imports made is never collected: no child spends its collections scanning it
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            req = _line(conn)
            if req is None:
                return
            pid = os.fork()
            if pid == 0:
                conn.close()
                listener.close()
                _child(req)  # never returns
            try:
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall((json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n").encode())
            except OSError:  # the client gave up (a timeout: it killed the child)
                pass


def _line(conn, buf=None):
    """One JSON line from a socket (None at EOF); buf: bytes already read past earlier lines."""
    buf = buf if buf is not None else bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


class Preloaded:
    """The client: one server per pytest process, started on first use, stopped at exit."""

    def __init__(self, cwd, env: dict):
        import subprocess
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="nemo-ft-preloaded-")
        self.path = os.path.join(self.dir, "socket")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.preloaded", self.path], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(os.path.join(self.dir, "server.log"), "w"), text=True)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"tests/preloaded.py did not start: {open(os.path.join(self.dir, 'server.log')).read()[-3000:]}")

    def run(self, cmd: list, *, module: str = None, script: str = None, args=(), cwd, env: dict, timeout: float):
        """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)'s result, from a fork."""
        import signal
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory(dir=self.dir) as tmp, socket.socket(socket.AF_UNIX) as s:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            s.connect(self.path)
            s.sendall((json.dumps({"module": module, "script": script, "args": list(args), "cwd": str(cwd),
                                   "env": env, "stdout": out, "stderr": err}) + "\n").encode())
            buf = bytearray()
            started = _line(s, buf)
            if started is None:
                raise RuntimeError(f"tests/preloaded.py died: {_read(os.path.join(self.dir, 'server.log'))[-3000:]}")
            s.settimeout(timeout)
            try:
                ended = _line(s, buf)
            except TimeoutError:
                os.kill(started["pid"], signal.SIGKILL)
                raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err)) from None
            if ended is None:
                raise RuntimeError(f"tests/preloaded.py died: {_read(os.path.join(self.dir, 'server.log'))[-3000:]}")
            code = ended["code"]
            return subprocess.CompletedProcess(cmd, code, _read(out), _read(err))

    def close(self) -> None:
        import shutil

        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.path)  # an empty request: the server returns
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    serve(sys.argv[1])
