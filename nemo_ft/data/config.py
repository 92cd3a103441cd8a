"""The prep stage's configuration: the resolved Hydra config checked into a PrepConfig, every
failure a ConfigError naming its key (before any row is read)."""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from nemo_ft.data import formats
from nemo_ft.data.split import SPLITS, check_ratios
from nemo_ft.data.tokenize import Template
from nemo_ft.errors import ConfigError

TASKS = ("sft", "chat", "dpo", "rm", "rlhf")
PREFIX_MISMATCH = ("fix", "reject")


@dataclass
class InputSpec:
    path: str
    weight: float = 1.0
    format: str = "auto"
    split: Optional[str] = None  # force every row of this input into one split
    # General-domain data mixed into training to keep what the base knew: its rows that the split does
    # not send to train go to general.jsonl (eval's forgetting slice), not to validation/test.
    general: bool = False


@dataclass
class PrepConfig:
    inputs: List[InputSpec]
    out_dir: str
    task: str = "sft"
    tokenizer_library: str = "sentencepiece"
    tokenizer_model: str = ""
    template: Template = field(default_factory=Template)
    seq_length: int = 2048
    over_length: str = "truncate"
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.85
    num_perm: int = 64
    shingle_size: int = 3
    split: Dict[str, float] = field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05})
    split_seed: int = 1234
    mix_total: Optional[int] = None
    mix_seed: int = 1234
    pack: bool = False
    pack_splits: List[str] = field(default_factory=lambda: ["train"])
    seed: int = 0
    workers: int = 0
    chunk_size: int = 1000
    progress: bool = True
    dpo_prefix_mismatch: str = "fix"
    dpo_append_eod: bool = False
    dpo_prompt_format: str = "plain"
    rm_append_eod: bool = False  # = the reward model's model.data.append_eod (train and serve alike)

    @classmethod
    def from_dict(cls, c: dict) -> "PrepConfig":
        """Validate the resolved Hydra config; every failure names its key."""
        raw_inputs = list(c.get("inputs") or [])
        if c.get("input"):
            raw_inputs = [c["input"]] + raw_inputs
        if not raw_inputs:
            raise ConfigError("input", "no input given: pass input=FILE.jsonl or inputs=[{path: FILE, weight: 1}]")
        inputs = []
        for i, item in enumerate(raw_inputs):
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or "path" not in item:
                raise ConfigError(f"inputs[{i}]", f"expected a path or {{path: ..., weight: ...}}, got {item!r}")
            unknown = set(item) - {"path", "weight", "format", "split", "general"}
            if unknown:
                raise ConfigError(f"inputs[{i}]", f"unknown keys {sorted(unknown)}; allowed: path, weight, format, "
                                                  "split, general")
            spec = InputSpec(path=str(item["path"]), weight=float(item.get("weight", 1.0)),
                             format=item.get("format") or c.get("format") or "auto", split=item.get("split"),
                             general=bool(item.get("general", False)))
            if spec.general and spec.split not in (None, "train"):
                raise ConfigError(f"inputs[{i}].general", f"a general input trains and holds out its own rows; it "
                                                          f"cannot also be forced into split={spec.split}")
            if not os.path.isfile(spec.path):
                raise ConfigError(f"inputs[{i}].path", f"no such file: {spec.path}")
            if spec.format != "auto" and spec.format not in formats.FORMATS:
                raise ConfigError(f"inputs[{i}].format", f"unknown format {spec.format!r}; expected auto or one of {list(formats.FORMATS)}")
            if spec.split is not None and spec.split not in SPLITS:
                raise ConfigError(f"inputs[{i}].split", f"expected one of {SPLITS}, got {spec.split!r}")
            if spec.weight < 0:
                raise ConfigError(f"inputs[{i}].weight", f"must be >= 0, got {spec.weight}")
            inputs.append(spec)
        task = c.get("task", "sft")
        if task not in TASKS:
            raise ConfigError("task", f"expected one of {TASKS}, got {task!r}")
        tcfg = dict(c.get("template") or {})
        try:
            template = Template(**tcfg)
        except TypeError as err:
            raise ConfigError("template", f"{err}; allowed: {list(Template.__dataclass_fields__)}") from None
        if task in ("sft", "rlhf"):
            template.check_keys()
        if task == "rlhf" and template.add_bos:
            raise ConfigError("template.add_bos", "NeMo-Aligner's RLHF dataset encodes prompts without BOS: a prompt "
                                                  "would not start as SFT's did; use add_bos=false")
        seq_length = c.get("seq_length", 2048)
        if not isinstance(seq_length, int) or seq_length < 2:
            raise ConfigError("seq_length", f"expected an integer >= 2, got {seq_length!r}")
        over = c.get("over_length", "truncate")
        if over not in ("truncate", "reject"):
            raise ConfigError("over_length", f"expected truncate or reject, got {over!r}")
        if c.get("pack") and task == "rlhf":
            raise ConfigError("pack", "RLHF prompts are generated from one by one: pack needs task=sft or task=chat")
        if c.get("pack") and task == "rm":
            raise ConfigError("pack", "NeMo-Aligner's reward model reads unpacked chosen/rejected lines; pack needs "
                                      "task=sft or task=chat")
        if c.get("pack") and task == "dpo":
            raise ConfigError("pack", "prep packs NeMo's SFT format (GPTSFTPackedDataset): pack needs task=sft or "
                                      "task=chat; for packed DPO run NeMo-Aligner's prepare_packed_dpo_dataset.py "
                                      "on prep's DPO output (its packs hold chosen+rejected pairs)")
        dpo = dict(c.get("dpo") or {})
        unknown = set(dpo) - {"prefix_mismatch", "append_eod", "prompt_format"}
        if unknown:
            raise ConfigError("dpo", f"unknown keys {sorted(unknown)}; allowed: prefix_mismatch, append_eod, "
                                     "prompt_format")
        prompt_format = dpo.get("prompt_format", "plain")
        if prompt_format not in formats.DPO_PROMPT_FORMATS:
            raise ConfigError("dpo.prompt_format", f"expected one of {formats.DPO_PROMPT_FORMATS}, got {prompt_format!r}")
        prefix_mismatch = dpo.get("prefix_mismatch", "fix")
        if prefix_mismatch not in PREFIX_MISMATCH:
            raise ConfigError("dpo.prefix_mismatch", f"expected fix or reject, got {prefix_mismatch!r}")
        rm = dict(c.get("rm") or {})
        if set(rm) - {"append_eod"}:
            raise ConfigError("rm", f"unknown keys {sorted(set(rm) - {'append_eod'})}; allowed: append_eod")
        dedup = dict(c.get("dedup") or {})
        split = dict(c.get("split") or {})
        split_seed = split.pop("seed", 1234)
        pk = dict(c.get("pack_options") or {})
        pack_splits = list(pk.get("splits", ["train"]))
        for s in pack_splits:
            if s not in SPLITS:
                raise ConfigError("pack_options.splits", f"unknown split {s!r}")
        tok = dict(c.get("tokenizer") or {})
        m = dict(c.get("mix") or {})
        threshold = float(dedup.get("near_threshold", 0.85))
        if not 0 < threshold <= 1:
            raise ConfigError("dedup.near_threshold", f"must be in (0, 1], got {threshold}")
        return cls(
            inputs=inputs, out_dir=str(c.get("out_dir") or "runs/prep"), task=task,
            tokenizer_library=tok.get("library", "sentencepiece"), tokenizer_model=str(tok.get("model") or ""),
            template=template, seq_length=seq_length, over_length=over,
            dedup_exact=bool(dedup.get("exact", True)), dedup_near=bool(dedup.get("near", True)),
            near_threshold=threshold, num_perm=int(dedup.get("num_perm", 64)),
            shingle_size=int(dedup.get("shingle_size", 3)),
            split=check_ratios(split) if split else check_ratios({"train": 0.9, "validation": 0.05, "test": 0.05}),
            split_seed=int(split_seed), mix_total=m.get("total"), mix_seed=int(m.get("seed", 1234)),
            pack=bool(c.get("pack", False)), pack_splits=pack_splits, seed=int(c.get("seed", 0)),
            workers=int(c.get("workers", 0)), chunk_size=int(c.get("chunk_size", 1000)),
            progress=bool(c.get("progress", True)),
            dpo_prefix_mismatch=prefix_mismatch, dpo_append_eod=bool(dpo.get("append_eod", False)),
            dpo_prompt_format=prompt_format, rm_append_eod=bool(rm.get("append_eod", False)),
        )
