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
environment variables read at import are this server's; numpy's global RNG is reseeded in each
fork (a fresh process seeds it from the OS) but the str hash seed is the server's; the fork's
parent is this server, not the caller.

What the imports decide from the environment is rank-dependent (NeMo's logger keeps its stream
handlers only on global rank 0, Lightning's rank_zero_only.rank is read from RANK), so there are two
servers: one started as rank 0 (stage_env()) for single-process runs and torchrun's rank 0, one
started as RANK=1 for torchrun's other ranks. What the imports add to the environment
(Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1) is added to each run's, as in a fresh process.

Ranks under torchrun run `tests/preloaded.py module:<name> args...` (the `rank` client below): it
hands its environment (torchrun's RANK, WORLD_SIZE, MASTER_PORT, ...) and stdio to a fork in a
session of its own, passes the signals torchrun sends on to that session, and exits with the fork's
code. A client dies with torchrun (PDEATHSIG), a fork with its server, and the server kills a fork
whose client is gone (torchrun's SIGKILL, a test's timeout): no rank outlives its launcher. Runs a
test signals or kills itself, servers and sbatch jobs are fresh processes, as before.
NEMO_FT_TEST_PRELOAD=0 turns this off (every run a fresh process).

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
# where rank clients find the servers: rank 0's, and the other ranks' (set by tests/conftest.start_process)
SOCKET_ENV, OTHER_RANKS_SOCKET_ENV = "NEMO_FT_TEST_PRELOAD_SOCKET", "NEMO_FT_TEST_PRELOAD_SOCKET_RANKS"
MAX_MSG = 1 << 20
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int, parent: int) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), sig)


def _child(req: dict, fds: list, server: int, added_env: dict) -> None:
    _die_with_parent(signal.SIGKILL, server)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    if req.get("session"):
        os.setsid()  # the client signals this fork's group, as torchrun signals a fresh rank's
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update({**req["env"], **added_env})  # what the imports set (unconditionally: Lightning, torch)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # from the OS, as a fresh process's numpy does
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

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # gone with the pytest process that started it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through the finally below: the forks go too
    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    added_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    server = os.getpid()
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
                    fds = []
                    try:
                        msg, fds, _, _ = socket.recv_fds(conn, MAX_MSG, 3)
                        req = json.loads(msg) if msg else None
                        if req is None or req.get("stop"):  # connected and gone, or close()
                            conn.close()
                            if req is None:
                                continue
                            return
                        pid = os.fork()
                    except Exception as err:  # this request fails, not the server and the other runs
                        _send(conn, {"error": f"{type(err).__name__}: {err}"})
                        conn.close()
                        continue
                    finally:
                        if os.getpid() == server:
                            for fd in fds:
                                os.close(fd)
                    if pid == 0:
                        sel.close()
                        listener.close()
                        for c in (*children.values(), conn):
                            c.close()
                        children.clear()  # not this fork's to kill in the finally below, on its way out
                        _child(req, fds, server, added_env)  # never returns
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
    reply = json.loads(s.recv(MAX_MSG) or b'{"error": "the server closed the connection (it died?)"}')
    if "error" in reply:
        s.close()
        raise RuntimeError(f"tests/preloaded.py could not start the run: {reply['error']}")
    return s, reply["pid"]


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:  # it has just ended
        pass


def rank(argv: list) -> None:
    """`tests/preloaded.py module:<name>|script:<path> args...` as torchrun's worker: one rank, forked."""
    _die_with_parent(signal.SIGKILL, os.getppid())  # with torchrun: then the server kills the fork
    kind, _, name = argv[0].partition(":")
    path = os.environ[SOCKET_ENV if os.environ.get("RANK", "0") == "0" else OTHER_RANKS_SOCKET_ENV]
    s, pid = _request(path, {kind: name, "args": argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
                             "session": True}, [0, 1, 2])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        # torchrun stops its workers with these, to their process group
        signal.signal(sig, lambda signum, _frame: _signal(pid, signum, group=True))
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
                    _signal(pid, signal.SIGKILL)
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
