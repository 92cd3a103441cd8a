"""`nemo-ft export`: a trained adapter .nemo (any TP/PP) -> what Triton, NIM, vLLM and HF load, proven equal.

    nemo-ft export from_run=runs/demo/sft out_dir=runs/demo/export merge=true

The tensor work is the pure core's (nemo_ft.export: gather the TP x PP shards into the canonical
TP=1 adapter, merge W + (alpha/r)·B·A in fp32, map NeMo <-> HF Llama and LoRA -> HF-PEFT); this file
reads the inputs, runs NeMo to check what it wrote, and lays the files out:

  adapter_tp1.nemo              canonical TP=1 PP=1 adapter; NeMo restores it onto the base here
  nim/<name>/<name>.nemo        NIM's NeMo-format layout ($NIM_PEFT_SOURCE/<name>/)
  nim/<name>-hf/                NIM's HF-format layout (= hf_peft)
  hf_base/                      the base as an HF LlamaForCausalLM (safetensors, config.json, tokenizer)
  hf_peft/                      adapter_config.json + adapter_model.safetensors, unmerged (LoRA)
  merged/merged.nemo, merged_hf/   merge=true (LoRA): the base with the adapter folded in
  serving.md                    the Triton / NIM / vLLM commands for this adapter
  manifest.json                 inputs, outputs, every check's measured difference

Everything is built in a temp dir next to out_dir and renamed at the end: a failed export leaves no
half-written out_dir. With verify=true (default) NeMo restores adapter_tp1.nemo and (with merge)
merged.nemo's weights, transformers loads hf_base/, peft loads hf_peft/ onto it, and their logits on
two probe sequences must agree within `tolerance`, or the export fails.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from nemo_ft import artifacts
from nemo_ft.config.entry import stage_main
from nemo_ft.errors import ConfigError, InputError
from nemo_ft import reshard
from nemo_ft.nemo_archive import NemoArchive
from nemo_ft.stages import lifecycle

NEMO_INPUTS = ("adapter", "base")
LORA_SCHEMES = ("lora", "qlora")


def derive(cfg: DictConfig) -> list[str]:
    """Adapter, base and name from the upstream run's manifest; build in a temp dir next to out_dir."""
    notes = []
    if cfg.from_run:
        m = artifacts.read_manifest(cfg.from_run, stage=("sft", "dpo", "reinforce", "ppo"), key="from_run")
        if not cfg.adapter:
            cfg.adapter = str(m.output("adapter"))
        # A DPO run started from an SFT adapter trains on the SFT-merged base it wrote (output "base").
        base = str(m.output("base")) if m.records("base") else (m.input("base") or {}).get("path")
        if not cfg.base and base:
            cfg.base = base
        if not cfg.adapter_name:
            cfg.adapter_name = Path(cfg.from_run).resolve().name
        notes.append(f"from {m.path}: adapter {cfg.adapter}, base {cfg.base}")
    if cfg.adapter and not cfg.adapter_name:
        cfg.adapter_name = Path(str(cfg.adapter)).stem
    out = Path(cfg.out_dir).resolve()
    cfg.out_dir = str(out)
    cfg.run.dir = str(out.parent / f".{out.name}.partial")
    return notes


def _spec_and_configs(cfg):
    """(AdapterSpec, adapter config, base config, problems) read without NeMo."""
    from nemo_ft.export import AdapterSpec, ModelSpec

    with NemoArchive(cfg.adapter, key="adapter") as a:
        adapter_conf, layout = a.config(), a.layout()
    with NemoArchive(cfg.base, key="base") as b:
        base_conf = b.config()
    # A bad value inside a .nemo's own config is a problem of that file: name it.
    try:
        spec = AdapterSpec.from_nemo_config(adapter_conf)
    except ConfigError as err:
        raise InputError(err.message, path=str(cfg.adapter), key=err.key) from None
    try:
        base_model = ModelSpec.from_nemo_config(base_conf)
    except ConfigError as err:
        raise InputError(err.message, path=str(cfg.base), key=err.key) from None
    problems = []
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
                "ffn_hidden_size", "activation"):
        have, want = getattr(spec.model, key), getattr(base_model, key)
        if have != want:
            problems.append(InputError(f"the adapter was trained on another base: its {key} is {have!r}, "
                                       f"{Path(cfg.base).name} has {want!r}", path=str(cfg.adapter), key=key))
    if (layout.tp, layout.pp) != (spec.tp, spec.pp) and layout.kind != "single":
        problems.append(InputError(f"holds weights for TP={layout.tp} PP={layout.pp} but its config says "
                                   f"TP={spec.tp} PP={spec.pp}", path=str(cfg.adapter), key="adapter"))
    return spec, adapter_conf, base_conf, problems


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    """All problems at once. Without an adapter (and from_run) the base alone is exported (hf_base/)."""
    errors = []
    if not cfg.base:
        errors.append(ConfigError("base", "is required (or from_run=<an sft/dpo run dir> that names it)"))
    for key in NEMO_INPUTS:
        if cfg.get(key) and not Path(str(cfg[key])).exists():
            errors.append(ConfigError(key, f"file not found: {cfg[key]}"))
    if not cfg.adapter and cfg.merge:
        errors.append(ConfigError("merge", "needs an adapter to merge (adapter= or from_run=)"))
    if str(cfg.hf) not in ("auto", "True", "False", "true", "false"):
        errors.append(ConfigError("hf", f"{cfg.hf!r}: expected auto, true or false"))
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        prior = out / artifacts.MANIFEST
        try:
            is_export = artifacts.read_manifest(prior, stage="export").stage == "export"
        except InputError:
            is_export = False
        if not is_export:
            errors.append(ConfigError("out_dir", f"{out} exists and holds files that are not an export; choose "
                                                 "another out_dir"))
        elif not cfg.overwrite:
            errors.append(ConfigError("out_dir", f"{out} already holds an export ({prior}); set overwrite=true to "
                                                 "replace it"))
    if errors or skip or not cfg.adapter:
        return errors
    try:
        spec, _, _, problems = _spec_and_configs(cfg)
    except (ConfigError, InputError) as err:
        return errors + [err]
    errors += problems
    lora_only = spec.has_lora and all(s in LORA_SCHEMES for s in spec.schemes)
    why = (f"{','.join(spec.schemes)} is not LoRA: HF-PEFT LoRA and a merged checkpoint are defined only for "
           "LoRA's W + (alpha/r)·B·A; the TP=1 .nemo is exported")
    if not lora_only and str(cfg.hf).lower() == "true":
        errors.append(ConfigError("hf", why))
    if not lora_only and cfg.merge:
        errors.append(ConfigError("merge", why))
    return errors


class Probe:
    """Logits of the restored NeMo model on fixed probe sequences."""

    def __init__(self, vocab: int, length: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(3, vocab, (2, length), generator=g)

    def nemo(self, model):
        import torch

        with torch.no_grad():
            pos = torch.arange(self.tokens.shape[1])[None].expand_as(self.tokens)
            return model.model(self.tokens, pos, None).float()

    def hf(self, model):
        import torch

        with torch.no_grad():
            return model(input_ids=self.tokens).logits.float()


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def run(cfg: DictConfig) -> dict:
    run = lifecycle.start("export", cfg, checks=checks, derive=derive, nemo_inputs=NEMO_INPUTS, fresh_dir=True)
    out, tmp = Path(cfg.out_dir), run.dir
    try:
        summary = _export(run, cfg, tmp)
    except BaseException:
        if run.rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run.rank0:
        if out.exists():
            shutil.rmtree(out)  # checks() allowed only an earlier export with overwrite=true
        tmp.rename(out)
        run.log(f"exported {cfg.adapter} -> {out}")
    return summary


@dataclass
class _Base:
    """The base restored by NeMo at TP=1, its weights as exact fp32 numpy copies, its probe logits."""
    model: object
    conf: dict
    state: dict      # NeMo's live tensors (share storage with the model)
    np: dict         # fp32 copies: what the pure core maps and merges
    dtype: object    # of the HF / merged weights
    vocab: int       # padded vocabulary (embedding rows)
    probe: "Probe"
    logits: object


def _restore_base(run, cfg) -> _Base:
    import torch

    with NemoArchive(cfg.base, key="base") as b:
        conf = b.config()
    model = run.restore(cfg.base)
    model.eval()
    state = {k: v for k, v in model.model.state_dict().items() if not k.endswith("_extra_state")}
    dtype = getattr(torch, str(cfg.dtype)) if cfg.dtype else next(iter(state.values())).dtype
    base_np = {k: v.detach().float().numpy().copy() for k, v in state.items()}
    vocab = base_np["embedding.word_embeddings.weight"].shape[0]
    probe = Probe(vocab, int(cfg.probe_tokens))
    return _Base(model, conf, state, base_np, dtype, vocab, probe, probe.nemo(model))


def _export_base_only(run, cfg, tmp: Path) -> dict:
    """No adapter given: the base alone as an HF Llama checkpoint (e.g. after `nemo-ft import`)."""
    from nemo_ft.export import ModelSpec

    base = _restore_base(run, cfg)
    outputs = _write_hf_base(cfg, tmp, base, ModelSpec.from_nemo_config(base.conf))
    checks_done = {}
    if cfg.verify:
        checks_done.update(_verify_hf(tmp, cfg, base.probe, {"base": base.logits}, float(cfg.tolerance), peft=False))
    summary = {"base_only": True, "dtype": str(base.dtype).replace("torch.", ""), "checks": checks_done}
    run.finish(summary, outputs=outputs, inputs={"base": cfg.base})
    for what, diff in checks_done.items():
        run.log(f"check {what}: {diff}")
    return summary


def _export(run: lifecycle.StageRun, cfg: DictConfig, tmp: Path) -> dict:
    import torch

    from nemo_ft import export as core

    if not cfg.adapter:
        return _export_base_only(run, cfg, tmp)
    spec, adapter_conf, base_conf, _ = _spec_and_configs(cfg)
    name = str(cfg.adapter_name)
    lora = spec.has_lora and all(s in LORA_SCHEMES for s in spec.schemes)
    hf = lora and str(cfg.hf).lower() != "false"
    outputs, checks_done = {}, {}

    # 1. the canonical TP=1 adapter: pure gather, written as NeMo's PEFT .nemo (config + one weights file)
    adapter = reshard.read_adapter(cfg.adapter)
    canonical = adapter.canonical
    tp1 = reshard.write_tp1(adapter, tmp / "adapter_tp1.nemo")
    outputs["adapter_tp1"] = tp1
    nim = tmp / "nim" / name
    nim.mkdir(parents=True)
    shutil.copy(tp1, nim / f"{name}.nemo")
    outputs["nim_nemo"] = nim / f"{name}.nemo"

    # 2. NeMo restores the base (TP=1) and, later, the canonical adapter onto it
    base = _restore_base(run, cfg)
    model, base_np, out_dtype, vocab, probe = base.model, base.np, base.dtype, base.vocab, base.probe
    tol = float(cfg.tolerance)
    logits = {"base": base.logits}

    if cfg.merge:
        merged = core.merge_lora(base_np, canonical, spec)
        changed = [k for k in merged if merged[k] is not base_np[k]]
        params = dict(model.model.named_parameters())
        with torch.no_grad():
            for k in changed:
                params[k].copy_(torch.from_numpy(merged[k]).to(params[k].dtype))
            logits["merged"] = probe.nemo(model)
            (tmp / "merged").mkdir()
            model.save_to(str(tmp / "merged" / "merged.nemo"))  # a plain base .nemo: no adapter is attached yet
            for k in changed:  # back to the base (base_np is its exact fp32 copy) before the adapter goes on
                params[k].copy_(torch.from_numpy(base_np[k]).to(params[k].dtype))
        outputs["merged_nemo"] = tmp / "merged" / "merged.nemo"

    model.load_adapters(str(tp1))  # NeMo's own loader, scheme and targets from adapter_tp1.nemo's config
    loaded = {k: v for k, v in model.state_dict().items() if "adapter" in k or "prompt_encoder" in k}
    mismatched = [k for k, v in adapter.torch_state().items()
                  if k not in loaded or not torch.equal(loaded[k].to(v.dtype), v)]
    if mismatched:
        raise InputError(f"NeMo restored adapter_tp1.nemo with other weights than were written: {mismatched[:3]}",
                         path=str(tp1))
    checks_done["nemo_restores_adapter_tp1"] = {"tensors": len(canonical), "equal": True}
    logits["adapter"] = probe.nemo(model)
    checks_done["adapter_changes_logits"] = _max_diff(logits["adapter"], logits["base"])
    if cfg.merge:
        checks_done["merged_vs_unmerged_nemo"] = _require(_max_diff(logits["merged"], logits["adapter"]), tol,
                                                          "merged.nemo vs base + adapter_tp1.nemo (NeMo)")

    # 3. Hugging Face: the base, the unmerged LoRA, the merged model
    hf_reason = None if hf else ("disabled (hf=false)" if lora else
                                 f"{','.join(spec.schemes)} is not LoRA: HF-PEFT covers LoRA only")
    if hf:
        outputs.update(_write_hf_base(cfg, tmp, base, spec.model))
        outputs.update(_write_hf_peft(tmp, canonical, spec, out_dtype))
        if cfg.merge:
            outputs.update(_write_hf_weights(tmp / "merged" / "merged_hf", base_conf, merged, spec.model, out_dtype, vocab,
                                             tokenizer_from=tmp / "hf_base"))
        nim_hf = tmp / "nim" / f"{name}-hf"
        shutil.copytree(tmp / "hf_peft", nim_hf)
        outputs["nim_hf"] = sorted(nim_hf.iterdir())
        if cfg.verify:
            checks_done.update(_verify_hf(tmp, cfg, probe, logits, tol))
    (tmp / "serving.md").write_text(serving_md(cfg, spec, name, hf, bool(cfg.merge)))
    outputs["serving_md"] = tmp / "serving.md"

    summary = {
        "adapter_name": name, "peft_scheme": ",".join(spec.schemes), "trained_tp": spec.tp, "trained_pp": spec.pp,
        "rank": spec.adapter_dim if spec.has_lora else None, "alpha": spec.alpha if spec.has_lora else None,
        "targets": list(spec.targets) if spec.has_lora else None,
        "dtype": str(out_dtype).replace("torch.", ""), "merged": bool(cfg.merge), "hf": hf,
        "hf_skipped": hf_reason, "checks": checks_done,
        "tensorrt_llm_drops": trtllm_dropped(spec),
    }
    run.finish(summary, outputs=outputs, inputs={"adapter": cfg.adapter, "base": cfg.base})
    for what, diff in checks_done.items():
        run.log(f"check {what}: {diff}")
    return summary


def _require(diff: float, tol: float, what: str) -> float:
    if not diff <= tol:
        raise InputError(f"{what}: logits differ by {diff:.3g} > tolerance {tol:g}; the export is not equivalent")
    return diff


def _save_safetensors(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def _write_hf_weights(folder: Path, base_conf: dict, state_np: dict, model_spec, dtype, vocab: int,
                      tokenizer_from: Path | None = None) -> dict:
    """An HF LlamaForCausalLM folder from a NeMo base state (numpy): weights, config.json, tokenizer."""
    import torch

    from nemo_ft import export as core

    folder.mkdir(parents=True)
    hf_state = core.nemo_to_hf_llama(state_np, model_spec)
    weights = _save_safetensors(folder / "model.safetensors", {k: torch.from_numpy(v.copy()).to(dtype)
                                                               for k, v in hf_state.items()})
    tok = json.loads((tokenizer_from / "config.json").read_text()) if tokenizer_from else {}
    config = core.hf_llama_config(base_conf, vocab_size=vocab, torch_dtype=str(dtype).replace("torch.", ""),
                                  bos_token_id=tok.get("bos_token_id"), eos_token_id=tok.get("eos_token_id"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = [weights, folder / "config.json"]
    if tokenizer_from:
        for f in sorted(tokenizer_from.iterdir()):
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, folder / f.name)
                files.append(folder / f.name)
    return {f"{folder.name}": files}


def _write_hf_base(cfg, tmp: Path, base: _Base, model_spec) -> dict:
    out = _write_hf_weights(tmp / "hf_base", base.conf, base.np, model_spec, base.dtype, base.vocab)
    tok_files, ids = save_llama_tokenizer(cfg.base, tmp / "hf_base")
    config = json.loads((tmp / "hf_base" / "config.json").read_text())
    config.update(ids)
    (tmp / "hf_base" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "hf_base" / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}, indent=2) + "\n")
    out["hf_base"] = out["hf_base"] + tok_files + [tmp / "hf_base" / "generation_config.json"]
    return out


def _write_hf_peft(tmp: Path, canonical: dict, spec, dtype) -> dict:
    import torch

    from nemo_ft import export as core

    peft_dir = tmp / "hf_peft"
    peft_dir.mkdir()
    tensors = core.lora_to_hf_peft(canonical, spec)
    _save_safetensors(peft_dir / "adapter_model.safetensors",
                      {k: torch.from_numpy(v.copy()).to(dtype) for k, v in tensors.items()})
    (peft_dir / "adapter_config.json").write_text(json.dumps(core.hf_peft_adapter_config(spec, "../hf_base"),
                                                             indent=2) + "\n")
    return {"hf_peft": sorted(peft_dir.iterdir())}


def save_llama_tokenizer(base, folder: Path) -> tuple[list, dict]:
    """The base's SentencePiece model as HF's LlamaTokenizer (tokenizer.model) and its fast
    tokenizer.json, without BOS/EOS added (as NeMo's generation and SFT prompts): what vLLM and
    transformers load. Returns (files, {bos_token_id, eos_token_id})."""
    import tempfile

    from nemo_ft.runtime import patches

    patches.apply(patches.HF_FIXES)
    from transformers import AutoTokenizer, LlamaTokenizer

    with NemoArchive(base, key="base") as archive:
        name = archive.tokenizer_file()
        found = [n for n in archive.files() if Path(n).name == name] if name else []
        if not found or not name.endswith(".model"):
            raise InputError(f"carries no SentencePiece tokenizer model ({name!r}); hf_base needs one", path=str(base))
        data = archive.read(found[0])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.model").write_bytes(data)
        LlamaTokenizer(vocab_file=str(Path(d) / "tokenizer.model"), legacy=True, add_bos_token=False,
                       add_eos_token=False).save_pretrained(d)
        fast = AutoTokenizer.from_pretrained(d)  # converts to tokenizer.json
        fast.save_pretrained(str(folder))
    # add_prefix_space in tokenizer_config.json makes LlamaTokenizerFast rebuild tokenizer.json from the
    # slow tokenizer at every load (needing sentencepiece + protobuf in the serving env); tokenizer.json
    # already encodes the prefix space.
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("add_prefix_space", None)
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    files = sorted(p for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    return files, {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id}


def _verify_hf(tmp: Path, cfg, probe: Probe, logits: dict, tol: float, peft: bool = True) -> dict:
    """transformers on hf_base/ = NeMo's base; peft on hf_peft/ = NeMo base + adapter; merged_hf/ = both."""
    import logging

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    done = {}
    hf_base = LlamaForCausalLM.from_pretrained(str(tmp / "hf_base"), torch_dtype="auto")
    hf_base.eval()
    done["hf_base_vs_nemo_base"] = _require(_max_diff(probe.hf(hf_base), logits["base"]), tol, "hf_base vs NeMo base")
    if not peft:
        return done
    with_lora = PeftModel.from_pretrained(hf_base, str(tmp / "hf_peft"))
    with_lora.eval()
    done["hf_peft_vs_nemo_adapter"] = _require(_max_diff(probe.hf(with_lora), logits["adapter"]), tol,
                                               "hf_base + hf_peft (peft) vs NeMo base + adapter")
    if cfg.merge:
        merged = LlamaForCausalLM.from_pretrained(str(tmp / "merged" / "merged_hf"), torch_dtype="auto")
        merged.eval()
        done["merged_hf_vs_nemo_adapter"] = _require(_max_diff(probe.hf(merged), logits["adapter"]), tol,
                                                     "merged_hf vs NeMo base + adapter")
    return done


# TensorRT-LLM's NeMo LoRA loader (NeMo 2.4 deploy path) reads only the fused qkv adapter.
TRTLLM_TARGETS = {"attention_qkv": "attn_qkv", "attention_dense": "attn_dense", "mlp_fc1": "mlp_h_to_4h",
                  "mlp_fc2": "mlp_4h_to_h"}


def trtllm_dropped(spec) -> list:
    return [t for t in (spec.targets if spec.has_lora else ()) if t != "attention_qkv"]


def serving_md(cfg, spec, name: str, hf: bool, merged: bool) -> str:
    out = Path(cfg.out_dir)
    rank = spec.adapter_dim if spec.has_lora else None
    lines = [f"# Serving `{name}`", "",
             f"Exported from `{cfg.adapter}` (trained at TP={spec.tp} PP={spec.pp}, {','.join(spec.schemes)}"
             + (f", rank {rank}, alpha {spec.alpha:g}, targets {', '.join(spec.targets)}" if spec.has_lora else "")
             + f") on `{cfg.base}`.", ""]
    lines += ["## Triton + TensorRT-LLM (NeMo's deploy script, NGC container, GPU)", "", "```bash",
              "python scripts/deploy/nlp/deploy_triton.py \\",
              f"    --nemo_checkpoint {cfg.base} --model_type llama --triton_model_name {name} \\",
              "    --tensor_parallelism_size 1 --dtype bfloat16 \\",
              f"    --use_lora_plugin bfloat16 --lora_ckpt {out / 'adapter_tp1.nemo'} \\",
              f"    --lora_target_modules {' '.join(TRTLLM_TARGETS[t] for t in spec.targets) if spec.has_lora else ''} "
              f"--max_lora_rank {max(64, rank or 0)}", "```", ""]
    dropped = trtllm_dropped(spec)
    if dropped:
        lines += [f"**Warning:** TensorRT-LLM's NeMo LoRA loader reads only the fused qkv adapter "
                  f"(`lora_kqv_adapter`); this adapter's {', '.join(dropped)} weights would be dropped and the "
                  "served model would differ from the trained one. Serve `merged/` (merge=true) or vLLM/NIM's HF "
                  "layout instead.", ""]
    if not spec.has_lora:
        lines += [f"**Note:** {','.join(spec.schemes)} adapters have no TensorRT-LLM LoRA path; serve them with "
                  "NeMo in-framework (`nemo-ft serve engine=triton`).", ""]
    lines += ["## NIM", "", f"`nim/{name}/{name}.nemo` (NeMo format, NIM 1.x) and `nim/{name}-hf/` (HF format, "
              "what NIM 2.x documents): one folder per adapter, the folder name is the adapter's name.", "", "```bash",
              "docker run --gpus all -p 8000:8000 \\",
              f"    -e NIM_PEFT_SOURCE=/adapters -e NIM_PEFT_REFRESH_INTERVAL=60 -v {out / 'nim'}:/adapters \\",
              "    nvcr.io/nim/meta/<base-model-nim>:<tag>",
              "curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\",
              f"    -d '{{\"model\": \"{name}\", \"prompt\": \"...\", \"max_tokens\": 32, \"temperature\": 0}}'",
              "```", ""]
    if hf:
        lines += ["## vLLM", "", "```bash", f"python -m vllm.entrypoints.openai.api_server --model {out / 'hf_base'} \\",
                  f"    --enable-lora --lora-modules {name}={out / 'hf_peft'} --max-lora-rank {rank} \\",
                  "    --max-loras 2   # one spare slot: vLLM 0.32 applies the last slot's LoRA to base requests "
                  "batched with adapter requests", "```", "",
                  "Hugging Face: `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained('hf_base'), 'hf_peft')`.", ""]
    if merged:
        lines += ["## Merged", "", "`merged/merged_hf/` is a plain HF Llama checkpoint (no LoRA needed: vLLM, "
                  "TensorRT-LLM, any HF tool); `merged/merged.nemo` a NeMo base .nemo.", ""]
    return "\n".join(lines)


@stage_main("export", "export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
