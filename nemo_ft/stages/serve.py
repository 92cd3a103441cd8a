"""`nemo-ft serve`: what export wrote, served on 127.0.0.1 until Ctrl-C / SIGTERM — one base, many adapters.

    nemo-ft serve from_run=runs/demo/export engine=vllm port=8000
    nemo-ft serve from_run=runs/a/export engine=triton "adapters=['a=runs/a/export','b=runs/b/export']" port=8000

- engine=vllm: vLLM's OpenAI server (its own venv, `make serve-env`) on the export's hf_base/ with each
  adapter's hf_peft/ as a LoRA module: `/v1/models` lists the base and the adapters, `"model": "<name>"`
  picks one. Started as a child process; this process waits for it, supervises it and stops it.
- engine=triton: PyTriton in this process serving NeMo itself: the base .nemo restored as every stage
  restores it, each adapter's adapter_tp1.nemo loaded by NeMo, generation by
  nemo_ft.runtime.generation.greedy (eval's path); one Triton model per name (the base and each adapter).
  NeMo 2.4.1's own deployable cannot do this (NeMo 2 checkpoints and a GPU only).

Before anything starts, every adapter is checked against the served base, and all problems are reported
at once (exit 2): the export manifests' hashes of the files a server will load, the base each adapter
was trained on (sha256), its rank and the shape of every tensor. Then the server starts, must answer its
health checks within ready_timeout_s (else it is stopped and the tail of its own log printed, exit 1),
the request to send is printed, and `run.dir/serving.json` says where it listens. Ctrl-C, SIGTERM or the
server dying stops everything and waits until no process of it is left; manifest.json records the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from nemo_ft import artifacts
from nemo_ft.config.entry import StageErrors, stage_main
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.runtime import servers

ENGINES = ("vllm", "triton")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
             "ffn_hidden_size", "activation")


@dataclass
class Adapter:
    name: str
    export: Path
    manifest: artifacts.Manifest
    nemo: Path                      # adapter_tp1.nemo
    hf_peft: Optional[Path]         # hf_peft/ (LoRA)
    config: dict                    # adapter_tp1.nemo's model_config.yaml
    rank: Optional[int]


@dataclass
class Plan:
    """Everything the server will load, checked."""
    engine: str
    export: artifacts.Manifest
    base_sha256: str
    base_nemo: Path
    hf_base: Optional[Path]
    base_config: dict               # NeMo view of the base (for shapes)
    adapters: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)   # role -> paths, for the manifest


# ----------------------------------------------------------------------------------------------- checks

def _entries(value) -> list[tuple[Optional[str], str]]:
    """adapters= as [(name or None, dir)]: a list of 'name=dir' / 'dir' strings, or a {name: dir} mapping."""
    if value is None:
        return []
    if OmegaConf.is_dict(value) or isinstance(value, dict):
        return [(str(k), str(v)) for k, v in dict(value).items()]
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        out = []
        for item in value:
            name, sep, path = str(item).partition("=")
            out.append((name, path) if sep else (None, name))
        return out
    raise ConfigError("adapters", f"{value!r}: expected a list of name=export_dir (quote each: "
                      "\"adapters=['a=runs/a/export']\") or a mapping {a: runs/a/export}")


def _role_dir(m: artifacts.Manifest, role: str) -> Path:
    """Verify every file of a role (sha256) and return the folder holding them."""
    records = m.records(role)
    if not records:
        raise InputError(f"has no {role} output (roles: {sorted({r.get('role') for r in m.outputs})})",
                         path=str(m.path))
    for r in records:
        m.verify(r)
    return (m.dir / records[0]["path"]).parent


def safetensors_shapes(path: Path) -> dict:
    """{key: shape} from a .safetensors header (8-byte little-endian length, then JSON), without loading it."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _shape_problems(have: dict, want: dict, path: Path, what: str) -> list:
    problems = []
    for key in sorted(set(want) - set(have))[:3]:
        problems.append(InputError(f"{what}: {key} is missing", path=str(path)))
    for key in sorted(set(have) - set(want))[:3]:
        problems.append(InputError(f"{what}: {key} is not a tensor of this adapter on the served base", path=str(path)))
    for key in sorted(set(have) & set(want)):
        if tuple(have[key]) != tuple(want[key]):
            problems.append(InputError(f"{what}: {key} has shape {list(have[key])}, the served base needs "
                                       f"{list(want[key])}", path=str(path)))
            if len(problems) >= 3:
                break
    return problems


def _read_base(cfg, engine: str) -> Plan:
    from nemo_ft.nemo_archive import check_nemo, read_config

    m = artifacts.read_manifest(cfg.from_run, stage="export", key="from_run")
    base = m.input("base")
    if not base:
        raise InputError("records no base input", path=str(m.path), key="from_run")
    base_nemo = Path(base["path"])
    plan = Plan(engine=engine, export=m, base_sha256=base["sha256"], base_nemo=base_nemo, hf_base=None, base_config={})
    if cfg.merged:  # the export's merged model as the base: the adapter is in its weights, none is loaded
        if not m.records("merged_nemo"):
            raise InputError("has no merged model (export with merge=true)", path=str(m.path), key="merged")
        if engine == "vllm":
            from nemo_ft.export import nemo_config_from_hf

            plan.hf_base = _role_dir(m, "merged_hf")
            plan.base_config = nemo_config_from_hf(json.loads((plan.hf_base / "config.json").read_text()))
            plan.inputs["merged_hf"] = [m.dir / r["path"] for r in m.records("merged_hf")]
        else:
            plan.base_nemo = m.output("merged_nemo")
            check_nemo(plan.base_nemo, key="merged", trust=bool(cfg.run.trust_checkpoint))
            plan.base_config = read_config(plan.base_nemo, key="merged")
            plan.inputs["merged_nemo"] = plan.base_nemo
        plan.base_sha256 = m.records("merged_nemo")[0]["sha256"]
        return plan
    if engine == "vllm":
        from nemo_ft.export import nemo_config_from_hf

        plan.hf_base = _role_dir(m, "hf_base")
        hf_config = json.loads((plan.hf_base / "config.json").read_text())
        plan.base_config = nemo_config_from_hf(hf_config)
        plan.inputs["hf_base"] = [m.dir / r["path"] for r in m.records("hf_base")]
    else:
        if not base_nemo.exists():
            raise InputError(f"names the base {base_nemo}, which is missing", path=str(m.path), key="from_run")
        m.verify(base)  # the base .nemo is the one the export was checked against
        check_nemo(base_nemo, key="from_run", trust=bool(cfg.run.trust_checkpoint))
        plan.base_config = read_config(base_nemo, key="from_run")
        plan.inputs["base"] = base_nemo
    return plan


def _read_adapter(plan: Plan, name: Optional[str], where: str, key: str, trust: bool) -> tuple[Optional[Adapter], list]:
    """One adapter export checked against the served base: (Adapter, problems)."""
    from nemo_ft.export import AdapterSpec, ModelSpec, expected_keys, hf_peft_shapes
    from nemo_ft.nemo_archive import NemoArchive, check_nemo

    m = artifacts.read_manifest(where, stage="export", key=key)
    name = name or m.summary.get("adapter_name")
    if not m.records("adapter_tp1"):
        return None, [InputError("exports no adapter (a base-only export); name an export of an adapter",
                                 path=str(m.path), key=key)]
    if not name or not NAME.match(name):
        return None, [ConfigError(key, f"adapter name {name!r}: use letters, digits, '.', '_', '-' (<= 64)")]
    problems = []
    trained_on = m.input("base") or {}
    if trained_on.get("sha256") != plan.base_sha256:
        problems.append(InputError(
            f"adapter {name!r} was trained on another base: {trained_on.get('path')} (sha256 "
            f"{str(trained_on.get('sha256'))[:12]}), the served base is {plan.base_nemo} (sha256 "
            f"{plan.base_sha256[:12]})", path=str(m.path), key=key))
    nemo = m.output("adapter_tp1")  # sha256 checked
    with NemoArchive(nemo, key=key) as archive:
        config = archive.config()
    spec = AdapterSpec.from_nemo_config(config)
    base_model = ModelSpec.from_nemo_config(plan.base_config)
    for k in ARCH_KEYS:
        have, want = getattr(spec.model, k), getattr(base_model, k)
        if have != want:
            problems.append(InputError(f"adapter {name!r} does not fit the served base: its {k} is {have!r}, the "
                                       f"base's {want!r}", path=str(nemo), key=key))
    rank = spec.adapter_dim if spec.has_lora else None
    if rank is not None and m.summary.get("rank") not in (None, rank):
        problems.append(InputError(f"adapter {name!r}: the manifest says rank {m.summary.get('rank')}, "
                                   f"adapter_tp1.nemo has rank {rank}", path=str(m.path), key=key))
    on_base = dataclasses.replace(spec, model=base_model) if not problems else None
    hf_peft = None
    if plan.engine == "vllm":
        if not spec.has_lora or not m.records("hf_peft"):
            problems.append(InputError(f"adapter {name!r} has no hf_peft/ (vLLM serves LoRA adapters only); "
                                       "serve it with engine=triton", path=str(m.path), key=key))
        else:
            hf_peft = _role_dir(m, "hf_peft")
            peft_cfg = json.loads((hf_peft / "adapter_config.json").read_text())
            if peft_cfg.get("r") != rank:
                problems.append(InputError(f"r={peft_cfg.get('r')} but adapter_tp1.nemo has rank {rank}",
                                           path=str(hf_peft / "adapter_config.json"), key=key))
            if on_base is not None:
                weights = hf_peft / "adapter_model.safetensors"
                problems += _shape_problems(safetensors_shapes(weights), hf_peft_shapes(on_base), weights,
                                            f"adapter {name!r}")
    else:
        check_nemo(nemo, key=key, trust=trust)
        if on_base is not None:
            with NemoArchive(nemo, key=key) as archive:
                have = {k: tuple(t.shape) for state in archive.tensors().values() for k, t in state.items()}
            want = {k: p.shape for k, p in expected_keys(on_base).items()}
            problems += _shape_problems(have, want, nemo, f"adapter {name!r}")
    return Adapter(name, m.dir, m, nemo, hf_peft, config, rank), problems


def resolve(cfg: DictConfig) -> Plan:
    """Every check, every problem at once (StageErrors, exit 2), before anything is started."""
    errors: list = []
    engine = str(cfg.engine)
    if engine not in ENGINES:
        raise StageErrors([ConfigError("engine", f"{engine!r}: expected one of {', '.join(ENGINES)}")])
    if not cfg.from_run:
        raise StageErrors([ConfigError("from_run", "is required: an export directory (nemo-ft export out_dir=...)")])
    ports = {"port": cfg.port}
    if engine == "triton":
        ports["triton.grpc_port"] = cfg.triton.grpc_port if cfg.triton.grpc_port is not None else int(cfg.port) + 1
    for key, port in ports.items():
        if not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append(ConfigError(key, f"{port!r}: expected a TCP port 1..65535"))
        elif servers.port_in_use(port):
            errors.append(ConfigError(key, f"{servers.LOOPBACK}:{port} is in use; choose another port"))
    if not NAME.match(str(cfg.base_name)):
        errors.append(ConfigError("base_name", f"{cfg.base_name!r}: use letters, digits, '.', '_', '-'"))
    if engine == "vllm" and not Path(str(cfg.vllm.python)).exists():
        errors.append(ConfigError("vllm.python", f"{cfg.vllm.python} does not exist: build vLLM's venv with "
                                                 "`make serve-env`"))
    if engine == "triton":
        import importlib.util
        if importlib.util.find_spec("pytriton") is None:
            errors.append(ConfigError("engine", "triton needs PyTriton (nvidia-pytriton==0.5.10) in this venv: "
                                                "`make serve-env`"))
    try:
        entries = _entries(cfg.adapters)
    except ConfigError as err:
        raise StageErrors(errors + [err]) from None
    try:
        plan = _read_base(cfg, engine)
    except InputError as err:
        raise StageErrors(errors + [err]) from None
    if cfg.merged and entries:
        errors.append(ConfigError("adapters", "merged=true serves the merged model alone; leave adapters unset"))
        entries = []
    elif cfg.adapters is None and plan.export.records("adapter_tp1") and not cfg.merged:
        entries = [(None, str(cfg.from_run))]
    names = {}
    for i, (name, where) in enumerate(entries):
        key = f"adapters[{i}]" if cfg.adapters is not None else "from_run"
        try:
            adapter, problems = _read_adapter(plan, name, where, key, bool(cfg.run.trust_checkpoint))
        except (InputError, ConfigError) as err:
            errors.append(err)
            continue
        errors += problems
        if adapter is None:
            continue
        if adapter.name == cfg.base_name:
            errors.append(ConfigError(key, f"adapter name {adapter.name!r} is the base's (base_name)"))
        elif adapter.name in names:
            errors.append(ConfigError(key, f"adapter name {adapter.name!r} is given twice ({names[adapter.name]} "
                                           f"and {where})"))
        names[adapter.name] = where
        plan.adapters.append(adapter)
        plan.inputs[f"adapter:{adapter.name}"] = [adapter.nemo] if engine == "triton" else \
            [adapter.export / r["path"] for r in adapter.manifest.records("hf_peft")]
    if errors:
        raise StageErrors(errors)
    return plan


# ------------------------------------------------------------------------------------------------ serve

def log(message: str) -> None:
    print(f"[nemo-ft serve] {message}", flush=True)


def _max_model_len(cfg, plan: Plan) -> int:
    if cfg.max_model_len:
        return int(cfg.max_model_len)
    c = plan.base_config
    return int(c.get("max_position_embeddings") or c.get("encoder_seq_length"))


def example_requests(engine: str, port: int, names: list[str], prompt: str) -> list[str]:
    url = f"http://{servers.LOOPBACK}:{port}"
    pick = names[1] if len(names) > 1 else names[0]
    if engine == "vllm":
        body = json.dumps({"model": pick, "prompt": prompt, "max_tokens": 32, "temperature": 0})
        return [f"curl -s {url}/v1/models",
                f"curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'"]
    body = json.dumps({"inputs": [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
                                  {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [32]}]})
    return [f"curl -s {url}/v2/models/{pick}",
            f"curl -s {url}/v2/models/{pick}/infer -H 'Content-Type: application/json' -d '{body}'"]


def _announce(cfg, run_dir: Path, engine: str, names: list[str], ready_s: float, server_pid: int) -> dict:
    info = {"engine": engine, "url": f"http://{servers.LOOPBACK}:{cfg.port}", "models": names,
            "base": cfg.base_name, "ready_s": round(ready_s, 2), "pid": os.getpid(),
            "server_pid": server_pid}
    if engine == "triton":
        info["grpc"] = f"{servers.LOOPBACK}:{cfg.triton.grpc_port or int(cfg.port) + 1}"
    artifacts.write_json(run_dir / "serving.json", info)
    log(f"{engine} ready in {ready_s:.1f} s on {info['url']}: {', '.join(names)} ({cfg.base_name} = the base)")
    for line in example_requests(engine, int(cfg.port), names, str(cfg.example_prompt)):
        log(f"  {line}")
    log("Ctrl-C or SIGTERM stops it")
    return info


def _cluster_note(plan: Plan) -> None:
    serving_md = plan.export.dir / "serving.md"
    if serving_md.exists():
        log(f"on a cluster (NIM, Triton + TensorRT-LLM): {serving_md}")


def _finish(cfg, run_dir: Path, plan: Plan, summary: dict, logs: list[Path]) -> None:
    outputs = {"log": [p for p in logs if p.exists()]}
    if (run_dir / "serving.json").exists():
        outputs["serving"] = run_dir / "serving.json"

    def records(mapping, **kw):
        return [artifacts.file_record(p, role, **kw) for role, ps in mapping.items()
                for p in (ps if isinstance(ps, list) else [ps]) if Path(p).exists()]
    artifacts.write_manifest(run_dir, "serve", inputs=records(plan.inputs),
                             outputs=records(outputs, relative_to=run_dir),
                             config=OmegaConf.to_container(cfg, resolve=True), summary=summary,
                             dists=("nemo_toolkit", "nvidia-pytriton", "tritonclient"))


def serve_vllm(cfg, plan: Plan, run_dir: Path) -> dict:
    hf = json.loads((plan.hf_base / "config.json").read_text())
    dtype = str(cfg.vllm.dtype or hf.get("torch_dtype") or "auto")
    argv = servers.vllm_argv(str(cfg.vllm.python), plan.hf_base, str(cfg.base_name),
                             {a.name: a.hf_peft for a in plan.adapters}, [a.rank for a in plan.adapters],
                             int(cfg.port), dtype, _max_model_len(cfg, plan), list(cfg.vllm.extra_args))
    vlog = run_dir / "vllm.log"
    vlog.unlink(missing_ok=True)
    names = [str(cfg.base_name)] + [a.name for a in plan.adapters]
    summary = {"engine": "vllm", "models": names, "argv": argv}
    server = servers.ChildServer.start("vllm", argv, servers.vllm_env(cfg.vllm.kv_cache_gib, cfg.vllm.threads),
                                       vlog, cwd=run_dir)
    log(f"starting vLLM (pid {server.proc.pid}, log {vlog})")
    try:
        url = f"http://{servers.LOOPBACK}:{cfg.port}"
        summary["ready_s"] = servers.wait_ready([f"{url}/health", f"{url}/v1/models"], float(cfg.ready_timeout_s),
                                                server.died, vlog, int(cfg.log_lines))
        _, listed = servers.http_json(f"{url}/v1/models")
        served = sorted(d["id"] for d in (listed or {}).get("data", []))
        if served != sorted(names):
            raise servers.ServerFailed(f"/v1/models lists {served}, expected {sorted(names)}")
        _announce(cfg, run_dir, "vllm", names, summary["ready_s"], server.proc.pid)
        _cluster_note(plan)
        while server.died() is None:
            time.sleep(0.5)
        raise servers.ServerFailed(f"vLLM {server.died()}; the last lines of {vlog}:\n"
                                   f"{servers.log_tail(vlog, int(cfg.log_lines))}")
    finally:
        with servers.signals_ignored():
            summary["stop"] = server.stop(float(cfg.stop_timeout_s))
            log(f"vLLM stopped in {summary['stop']['stop_s']} s" + (f"; killed {summary['stop']['killed']}"
                                                                     if summary["stop"]["killed"] else ""))
            _finish(cfg, run_dir, plan, summary, [vlog])


def serve_triton(cfg, plan: Plan, run_dir: Path) -> dict:
    from nemo_ft.nemo_archive import NemoArchive
    from nemo_ft.runtime.multi_adapter import AdapterBank, triton_model
    from nemo_ft.stages import lifecycle

    names = [str(cfg.base_name)] + [a.name for a in plan.adapters]
    summary = {"engine": "triton", "models": names}
    tlog = run_dir / "triton.log"
    tlog.unlink(missing_ok=True)
    t0 = time.monotonic()
    run = lifecycle.start("serve", cfg, checks=lambda c, skip=(): [], nemo_inputs=())

    def read_weights(path):
        with NemoArchive(path, key="adapter") as archive:
            return {k: t for state in archive.tensors().values() for k, t in state.items()}
    bank = AdapterBank(restore=lambda: run.restore(str(plan.base_nemo)),
                       adapters={a.name: a.nemo for a in plan.adapters},
                       configs={a.name: a.config for a in plan.adapters}, read_weights=read_weights,
                       base_name=str(cfg.base_name))
    summary["restore"] = dict(bank.timings, models=len(bank.groups), load_s=round(time.monotonic() - t0, 2))
    log(f"NeMo restored {len(bank.groups)} model(s) for {len(plan.adapters)} adapter(s) in "
        f"{time.monotonic() - t0:.1f} s")
    tok = bank.groups[0].model.tokenizer
    context = _max_model_len(cfg, plan)
    models = {n: triton_model(bank, n, tok, context, int(cfg.triton.max_new_tokens)) for n in names}
    grpc_port = int(cfg.triton.grpc_port or int(cfg.port) + 1)
    triton, seen = None, {}
    try:
        t1 = time.monotonic()
        triton = servers.start_triton(models, int(cfg.port), grpc_port, tlog, int(cfg.triton.max_batch_size),
                                      int(cfg.triton.queue_delay_us))
        summary["ready_s"] = servers.wait_ready(servers.triton_ready_urls(int(cfg.port), names),
                                                float(cfg.ready_timeout_s),
                                                lambda: None if triton.is_alive() else "stopped", tlog,
                                                int(cfg.log_lines)) + (time.monotonic() - t1)
        server_pid = next((p for p in servers.descendants(os.getpid()) if _is_tritonserver(p)), None)
        _announce(cfg, run_dir, "triton", names, summary["ready_s"], server_pid)
        _cluster_note(plan)
        while triton.is_alive():
            servers.remember(os.getpid(), seen)
            time.sleep(0.5)
        raise servers.ServerFailed(f"Triton stopped; the last lines of {tlog}:\n"
                                   f"{servers.log_tail(tlog, int(cfg.log_lines))}")
    finally:
        with servers.signals_ignored():
            t2 = time.monotonic()
            if triton is not None:
                triton.stop()
            # PyTriton's stop waits for its server and backend stubs; anything still there is killed, not left.
            summary["stop"] = {"stop_s": round(time.monotonic() - t2, 2),
                               "killed": servers.kill_leftovers(os.getpid(), seen)}
            summary["swaps"], summary["swap_s"] = bank.timings["swaps"], round(bank.timings["swap_s"], 6)
            log(f"Triton stopped in {summary['stop']['stop_s']} s" + (f"; killed {summary['stop']['killed']}"
                                                                       if summary["stop"]["killed"] else ""))
            _finish(cfg, run_dir, plan, summary, [tlog])


def _is_tritonserver(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/tritonserver")
    except OSError:
        return False


def run(cfg: DictConfig) -> int:
    with servers.stop_signals():
        try:
            plan = resolve(cfg)
            run_dir = Path(cfg.run.dir).resolve()
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / artifacts.MANIFEST).unlink(missing_ok=True)
            (run_dir / "serving.json").unlink(missing_ok=True)
            (serve_vllm if plan.engine == "vllm" else serve_triton)(cfg, plan, run_dir)
        except KeyboardInterrupt as stop:
            log(f"stopped ({stop or 'SIGINT'})")
            return 0
        except servers.ServerFailed as err:
            print(f"nemo-ft serve: the server failed: {err}", file=sys.stderr, flush=True)
            return 1
    return 0


@stage_main("serve", "serve")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
