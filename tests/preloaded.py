"""A process that has imported what every NeMo stage imports first, and forks a child for each stage run.

`run_stage` and `model_probe` (tests/conftest.py) start ~200 stage processes per `make test` (torchrun
ranks counted once per run); each spent ~7 s of CPU importing torch and `nemo.utils` (Lightning,
torchmetrics, transformers) before running a line of its own, a third of the suite's time on 2
cores. Each pytest-xdist worker starts one of these instead, and every run is a fork of it that
runs the stage module as `python -m` does (runpy, `__main__`, sys.argv, sys.path[0] = cwd), with the
run's own cwd, environment and stdin/stdout/stderr (the caller's file descriptors, passed over the
socket), and exits through the interpreter's normal shutdown (atexit, flush). The stage's own code,
its Hydra entry point and everything NeMo imports after `nemo.utils` run in the child, in the order
a fresh process runs them: `lifecycle.start` imports torch (the input checks) and then `nemo.utils`
(quiet_nemo) before any runtime patch, so preloading exactly those two changes nothing a patch sees.
What differs: warnings printed while importing them go to this process's stderr, not the run's;
environment variables torch or Lightning read at import are this process's (stage_env(), the same
for every run); the child's parent is this server, not the caller.

Ranks under torchrun run `tests/preloaded.py module:<name> args...` (the `rank` client below): it
hands its environment (torchrun's RANK, WORLD_SIZE, MASTER_PORT, ...) and stdio to a fork, passes
on the signals torchrun sends, and exits with the fork's code. If a client dies (torchrun's SIGKILL,
a test's timeout), the server kills its fork: no rank outlives its launcher. Runs a test signals or
kills itself, servers and sbatch jobs are fresh processes, as before. NEMO_FT_TEST_PRELOAD=0 turns
this off (every run a fresh process).

Protocol: a SOCK_SEQPACKET Unix socket; one JSON message per request with the three stdio file
descriptors attached; the replies are {"pid": ...} when the fork starts and {"code": exit code}
(negative: killed by that signal) when it ends.
"""
import json
import os
import signal
import socket
import sys

PRELOAD = ("torch", "nemo.utils")
SOCKET_ENV = "NEMO_FT_TEST_PRELOAD_SOCKET"  # where clients find the server (set by tests/conftest.stage_env)
MAX_MSG = 1 << 20


def _child(req: dict, fds: list) -> None:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
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


def _send(conn, msg: dict) -> None:
    try:
        conn.send(json.dumps(msg).encode())
    except OSError:  # the client is gone
        pass


def serve(path: str) -> None:
    import ctypes
    import gc
    import importlib
    import selectors

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: gone with the pytest process that started it
    for name in PRELOAD:
        importlib.import_module(name)
    # A fork copies only the calling thread. The one other thread these imports start is jemalloc's
    # background purger (pyarrow's allocator), which jemalloc's own fork handlers reset in the child.
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert sorted(threads)[:-1] == ["jemalloc_bg_thd"] * (len(threads) - 1), f"not safe to fork: threads {threads}"
    gc.freeze()  # what the imports made is never collected: no child spends its collections scanning it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children = {}  # pid -> the client's connection
    print("ready", flush=True)
    try:
        while True:
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    msg, fds, _, _ = socket.recv_fds(conn, MAX_MSG, 3)
                    if not msg:  # connected and gone
                        conn.close()
                        continue
                    req = json.loads(msg)
                    if req.get("stop"):
                        conn.close()
                        return
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        listener.close()
                        for c in (*children.values(), conn):
                            c.close()
                        children.clear()  # not this fork's to kill in the finally below, on its way out
                        _child(req, fds)  # never returns
                    for fd in fds:
                        os.close(fd)
                    children[pid] = conn
                    _send(conn, {"pid": pid})
                    sel.register(conn, selectors.EVENT_READ)
                else:  # a client's socket turned readable: it hung up (killed, or gave up on a timeout)
                    sel.unregister(key.fileobj)
                    for pid, conn in children.items():
                        if conn is key.fileobj:
                            os.kill(pid, signal.SIGKILL)  # reaped below
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid)
                _send(conn, {"code": os.waitstatus_to_exitcode(status)})
                if conn.fileno() >= 0 and conn in (k.fileobj for k in sel.get_map().values()):
                    sel.unregister(conn)
                conn.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)


def _request(path: str, req: dict, fds: list):
    """Connect, send the request with fds; returns (socket, the fork's pid)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    socket.send_fds(s, [json.dumps(req).encode()], fds)
    reply = s.recv(MAX_MSG)
    if not reply:
        raise RuntimeError("tests/preloaded.py's server closed the connection (it died?)")
    return s, json.loads(reply)["pid"]


def rank(argv: list) -> None:
    """`tests/preloaded.py module:<name>|script:<path> args...` as torchrun's worker: one rank, forked."""
    kind, _, name = argv[0].partition(":")
    s, pid = _request(os.environ[SOCKET_ENV], {kind: name, "args": argv[1:], "cwd": os.getcwd(),
                                               "env": dict(os.environ)}, [0, 1, 2])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))  # torchrun stops its workers with these
    reply = s.recv(MAX_MSG)  # retried after a signal handler runs (PEP 475)
    code = json.loads(reply)["code"] if reply else 1
    if code < 0:  # killed by a signal: end the same way, so torchrun sees what a fresh rank would show
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


class Preloaded:
    """The server for one pytest process: started on first use, stopped at exit."""

    def __init__(self, cwd, env: dict):
        import subprocess
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="nemo-ft-preloaded-")
        self.path = os.path.join(self.dir, "socket")
        self.log = os.path.join(self.dir, "server.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.preloaded", "serve", self.path], cwd=cwd,
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests/preloaded.py did not start: {_read(self.log)[-3000:]}")

    def run(self, cmd: list, *, module: str = None, script: str = None, args=(), cwd, env: dict, timeout: float):
        """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)'s result, from a fork."""
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            fds = [os.open(os.devnull, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT, 0o644),
                   os.open(err, os.O_WRONLY | os.O_CREAT, 0o644)]
            try:
                s, pid = _request(self.path, {"module": module, "script": script, "args": list(args),
                                              "cwd": str(cwd), "env": env}, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            with s:
                s.settimeout(timeout)
                try:
                    reply = s.recv(MAX_MSG)
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err)) from None
            if not reply:
                raise RuntimeError(f"tests/preloaded.py died: {_read(self.log)[-3000:]}")
            return subprocess.CompletedProcess(cmd, json.loads(reply)["code"], _read(out), _read(err))

    def close(self) -> None:
        import shutil

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(self.path)
                s.send(json.dumps({"stop": True}).encode())
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
    serve(sys.argv[2]) if sys.argv[1] == "serve" else rank(sys.argv[1:])
