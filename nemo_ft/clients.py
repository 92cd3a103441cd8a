"""Clients for what `nemo-ft serve` runs, each engine through its own client, and a bounded load runner:
what the tests and benchmarks/serve_cpu.py send, and a reference for users.

- VllmClient: vLLM's OpenAI-compatible HTTP API (`/v1/completions`, greedy: temperature 0), plain HTTP.
  `return_token_ids` (a vLLM extension) returns the generated ids, EOS included; the client drops a final
  EOS so ids compare with NeMo's greedy (which excludes it).
- TritonClient: tritonclient.http against the Triton models `nemo-ft serve engine=triton` binds (one per
  name: the base and each adapter).
Every request has a timeout: a server that dies mid-request gives the caller an error, never a hang.
Standard library only, except tritonclient/numpy inside TritonClient.
"""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional


class ServeError(RuntimeError):
    """The server answered with an error (status and its message), or could not be reached in time."""

    def __init__(self, message: str, status: Optional[int] = None):
        self.status = status
        super().__init__(message if status is None else f"{status}: {message}")


@dataclass
class Completion:
    ids: list
    text: str
    finish_reason: str   # "stop" (EOS) or "length"
    latency_s: float


class VllmClient:
    def __init__(self, url: str, eos_id: Optional[int], timeout_s: float = 30.0):
        self.url, self.eos_id, self.timeout_s = url.rstrip("/"), eos_id, timeout_s

    def models(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=self.timeout_s) as r:
            return json.loads(r.read())["data"]

    def complete(self, model: str, prompt, max_tokens: int) -> Completion:
        """Greedy completion of a text prompt (or a list of token ids)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as err:
            raw = err.read().decode(errors="replace")
            try:
                raw = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise ServeError(raw, err.code) from None
        except (OSError, http.client.HTTPException, ValueError) as err:  # refused, reset, cut short, timed out
            raise ServeError(f"{type(err).__name__}: {err}") from None
        choice = out["choices"][0]
        ids = list(choice["token_ids"])
        if choice["finish_reason"] == "stop" and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return Completion(ids, choice["text"], choice["finish_reason"], time.perf_counter() - t)


class TritonClient:
    """One per thread: tritonclient's HTTP client is not thread-safe."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        import tritonclient.http as httpclient

        self._http = httpclient
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.client = httpclient.InferenceServerClient(self.url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def complete(self, model: str, prompt: str, max_tokens: int) -> Completion:
        import numpy as np
        from tritonclient.utils import InferenceServerException

        prompts = self._http.InferInput("prompts", [1, 1], "BYTES")
        prompts.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=object))
        budget = self._http.InferInput("max_tokens", [1, 1], "INT32")
        budget.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
        t = time.perf_counter()
        try:
            result = self.client.infer(model, [prompts, budget])
        except InferenceServerException as err:
            raise ServeError(err.message(), int(err.status()) if str(err.status()).isdigit() else None) from None
        except Exception as err:  # geventhttpclient: refused, reset, timed out
            raise ServeError(f"{type(err).__name__}: {err}") from None
        error = result.as_numpy("error")[0][0].decode()
        if error:
            raise ServeError(error, 400)
        ids = [int(i) for i in result.as_numpy("token_ids")[0] if i >= 0]
        return Completion(ids, result.as_numpy("text")[0][0].decode("utf-8"),
                          result.as_numpy("finish_reason")[0][0].decode(), time.perf_counter() - t)

    def close(self):
        self.client.close()


@dataclass
class LoadResult:
    answers: list            # per job: Completion or ServeError
    wall_s: float
    clients: int
    latencies: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [a for a in self.answers if isinstance(a, Exception)]

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]  # nearest rank

    def summary(self) -> dict:
        ok = len(self.answers) - len(self.errors)
        return {"requests": len(self.answers), "ok": ok, "errors": len(self.errors), "clients": self.clients,
                "wall_s": round(self.wall_s, 3), "req_per_s": round(ok / self.wall_s, 2) if self.wall_s else None,
                "p50_ms": round(1000 * self.percentile(50), 1), "p99_ms": round(1000 * self.percentile(99), 1)}


def run_load(make_client: Callable[[], object], jobs: list, clients: int, max_tokens: int,
             deadline_s: float = 300.0) -> LoadResult:
    """`clients` threads, each with its own client, send jobs [(model, prompt)] one after another (client i
    takes jobs i, i+clients, ...). Bounded: len(jobs) requests, each with the client's timeout, and the
    whole run stops being waited for at deadline_s (threads are daemons)."""
    answers: list = [None] * len(jobs)
    latencies: list = []
    lock = threading.Lock()

    def worker(i):
        client = make_client()
        try:
            for j in range(i, len(jobs), clients):
                model, prompt = jobs[j]
                try:
                    answers[j] = client.complete(model, prompt, max_tokens)
                    with lock:
                        latencies.append(answers[j].latency_s)
                except ServeError as err:
                    answers[j] = err
                except Exception as err:  # a client bug must show as an error, not as a silently dead thread
                    answers[j] = ServeError(f"client {type(err).__name__}: {err}")
        finally:
            getattr(client, "close", lambda: None)()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.0, deadline_s - (time.perf_counter() - t)))
    wall = time.perf_counter() - t
    answers = [a if a is not None else ServeError("no answer before the load deadline") for a in answers]
    return LoadResult(answers, wall, clients, latencies)
