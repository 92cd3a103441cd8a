"""`nemo-ft import`: a Hugging Face Llama-family checkpoint -> a base .nemo that the SFT stage restores.

    nemo-ft import hf=/models/Llama-3-8B out=/models/llama3_8b.nemo profile=llama3_8b

NeMo 2.4's own HF -> .nemo converter scripts are not in the wheel. This is the inverse of the export
mapping (nemo_ft.export.hf_to_nemo_llama: q/k/v fused per query group, gate/up into fc1), with the
model built by NeMo from the converted config and saved with NeMo's save_to. Before any model is
built: an architecture NeMo's GPT cannot reproduce, a tokenizer whose padded vocabulary is not the
checkpoint's, or a shape that differs from conf/model/<profile> is exit 2 naming the field. After:
NeMo's logits must equal transformers' on probe sequences (verify=true).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_ft.config.entry import stage_main
from nemo_ft.config.validate import ARCH_KEYS
from nemo_ft.errors import ConfigError, InputError
from nemo_ft.paths import CONF_DIR
from nemo_ft.stages import lifecycle


def _hf_config(cfg) -> dict:
    path = Path(str(cfg.hf)) / "config.json"
    if not path.exists():
        raise InputError("no config.json: not a Hugging Face model folder", path=str(path.parent), key="hf")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"is not valid JSON: {err}", path=str(path), key="hf") from None


def _tokenizer(hf_dir: Path) -> dict:
    """NeMo's tokenizer config for the HF folder's tokenizer: SentencePiece when there is a
    tokenizer.model (Llama 2, Mistral), else the HF tokenizer itself (Llama 3's tokenizer.json)."""
    if (hf_dir / "tokenizer.model").exists():
        return {"library": "sentencepiece", "type": None, "model": str(hf_dir / "tokenizer.model"), "vocab_file": None,
                "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    if (hf_dir / "tokenizer.json").exists():
        return {"library": "huggingface", "type": str(hf_dir), "model": None, "vocab_file": None, "merge_file": None,
                "delimiter": None, "use_fast": True}
    raise InputError("holds no tokenizer (tokenizer.model or tokenizer.json)", path=str(hf_dir), key="hf")


def _tokenizer_size(tok: dict) -> int:
    if tok["library"] == "sentencepiece":
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=tok["model"]).get_piece_size()
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(tok["type"]) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def derive(cfg: DictConfig) -> list[str]:
    """The NeMo model config from the HF config.json (refusing what NeMo's GPT cannot reproduce)."""
    from nemo_ft.export import nemo_config_from_hf

    if not cfg.hf or not cfg.out:
        raise ConfigError("hf" if not cfg.hf else "out", "is required: nemo-ft import hf=HF_DIR out=BASE.nemo")
    hf = _hf_config(cfg)
    fields = nemo_config_from_hf(hf)
    tok = _tokenizer(Path(str(cfg.hf)))
    with open_dict(cfg):
        for key, value in fields.items():
            cfg.model[key] = value
        cfg.model.tokenizer = tok
        cfg.model.precision = 32 if str(cfg.trainer.precision) in ("32", "32-true") else cfg.trainer.precision
    return [f"{hf.get('model_type')} {hf['hidden_size']}h x {hf['num_hidden_layers']} layers, "
            f"{hf['num_attention_heads']} heads / {fields['num_query_groups']} groups, vocab {hf['vocab_size']}"]


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    errors = []
    hf_dir = Path(str(cfg.hf))
    hf = _hf_config(cfg)
    weights = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
    if not weights:
        errors.append(InputError("holds no weights (*.safetensors or pytorch_model*.bin)", path=str(hf_dir), key="hf"))
    # NeMo pads the tokenizer's vocabulary to a multiple of make_vocab_size_divisible_by x TP; it must
    # come out as the checkpoint's embedding rows, or the weights cannot be loaded.
    size, div = _tokenizer_size(cfg.model.tokenizer), int(cfg.model.make_vocab_size_divisible_by)
    tp = int(cfg.model.get("tensor_model_parallel_size", 1))
    padded = -(-size // (div * tp)) * div * tp
    if padded != int(hf["vocab_size"]):
        errors.append(InputError(f"the tokenizer has {size} tokens, which NeMo pads to {padded}, but config.json "
                                 f"vocab_size is {hf['vocab_size']}", path=str(hf_dir), key="vocab_size"))
    if cfg.profile:
        import yaml

        path = Path(CONF_DIR) / "model" / f"{cfg.profile}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            return errors + [ConfigError("profile", f"no conf/model/{cfg.profile}.yaml; one of {', '.join(known)}")]
        profile = yaml.safe_load(path.read_text())
        for key in ARCH_KEYS:
            want, have = profile.get(key), cfg.model.get(key)
            if want is not None and have is not None and want != have:
                errors.append(ConfigError(f"model.{key}", f"conf/model/{cfg.profile}.yaml says {want!r} but the HF "
                                                          f"checkpoint has {have!r} ({hf_dir / 'config.json'})"))
    if Path(str(cfg.out)).exists():
        errors.append(ConfigError("out", f"{cfg.out} exists; remove it or choose another path"))
    return errors


def _hf_state(hf_dir: Path) -> dict:
    """The HF checkpoint's tensors as float32 numpy arrays (safetensors, or .bin read weights_only)."""
    import torch

    state = {}
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        for f in files:
            state.update(load_file(str(f)))
    else:
        for f in sorted(hf_dir.glob("pytorch_model*.bin")):
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {k: v.float().numpy() for k, v in state.items()}


def run(cfg: DictConfig) -> Path:
    import torch
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    from nemo_ft.export import ModelSpec, hf_to_nemo_llama

    run = lifecycle.start("import", cfg, checks=checks, derive=derive)
    hf_dir = Path(str(cfg.hf))
    model = run.build(MegatronGPTSFTModel, run.nemo_cfg(keep_arch=True))
    spec = ModelSpec.from_nemo_config(dict(cfg.model))
    mapped = hf_to_nemo_llama(_hf_state(hf_dir), spec, prefix="")
    params = model.model.state_dict()
    expected = {k for k in params if not k.endswith("_extra_state")}
    if set(mapped) != expected:
        raise InputError(f"maps to other tensors than NeMo's model has: missing {sorted(expected - set(mapped))[:4]}, "
                         f"extra {sorted(set(mapped) - expected)[:4]}", path=str(hf_dir), key="hf")
    with torch.no_grad():
        for k, v in mapped.items():
            if tuple(params[k].shape) != v.shape:
                raise InputError(f"{k}: HF shape {v.shape}, NeMo builds {tuple(params[k].shape)}", path=str(hf_dir))
            params[k].copy_(torch.from_numpy(v))
    checks_done = {}
    if cfg.verify:
        checks_done["nemo_vs_transformers_logits"] = _verify(model, hf_dir, int(cfg.probe_tokens), float(cfg.tolerance))
    out, _ = run.save_nemo(model, cfg.out)
    if run.rank0:
        run.finish({"hf_config": _hf_config(cfg), "checks": checks_done, "out": str(out)}, outputs={"base": out},
                   inputs={"hf": sorted(p for p in hf_dir.iterdir() if p.is_file())})
        run.log(f"{hf_dir} -> {out}; " + ", ".join(f"{k}: {v:.3g}" for k, v in checks_done.items()))
    return out


def _verify(model, hf_dir: Path, length: int, tol: float) -> float:
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    hf.eval()
    model.eval()
    tokens = torch.randint(3, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.model(tokens, torch.arange(length)[None].expand_as(tokens), None).float()
        theirs = hf(input_ids=tokens).logits.float()
    diff = float((ours - theirs).abs().max())
    if not diff <= tol:
        raise InputError(f"NeMo's logits differ from transformers' by {diff:.3g} > tolerance {tol:g}: the conversion "
                         "is not equivalent (nothing was written)", path=str(hf_dir), key="hf")
    return diff


@stage_main("import", "import")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
