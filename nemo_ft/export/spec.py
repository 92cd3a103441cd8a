"""What export needs to know about a NeMo GPT model and its PEFT adapter, read once from model_config.yaml.

ModelSpec is the base's shape (what the NeMo <-> HF Llama mapping needs); AdapterSpec adds the PEFT
scheme(s), the LoRA rank/alpha/targets and the TP/PP layout the adapter was saved with. Both are
built from the plain dict of a .nemo's model_config.yaml, keys as NeMo writes them, so the rest of
nemo_ft.export never reads a config. Errors name the NeMo key (model.*), as the stages' checks do.

Defaults follow NeMo 2.4's own code, not our conf/: a missing key means what NeMo would do with it.
Pure Python: no numpy needed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_ft.errors import ConfigError
from nemo_ft.peft import FAST_GATED, lora_targets, schemes_of

# Schemes whose adapter tensors nemo_ft.export can lay out (qlora saves the same adapters as lora:
# peft_config.py QLoraPEFTConfig(LoraPEFTConfig) adds nothing).
EXPORTABLE_SCHEMES = ("lora", "qlora", "ia3", "adapter", "ptuning")
# The NeMo config section each scheme reads (peft_config.py: cfg.peft.<section>).
SCHEME_SECTION = {"lora": "lora_tuning", "qlora": "lora_tuning", "ia3": "ia3_tuning",
                  "adapter": "adapter_tuning", "ptuning": "p_tuning"}


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(key, f"expected a positive integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(key, f"expected a positive integer, got {value!r}") from None
    if number != float(value) or number <= 0:
        raise ConfigError(key, f"expected a positive integer, got {value!r}")
    return number


def _number(value, key: str) -> float:
    # An unresolved interpolation ("${...}") shows up as a string: say so instead of guessing.
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {value!r} (an unresolved interpolation?)") from None


@dataclass(frozen=True)
class ModelSpec:
    """The base model's shape, in NeMo's terms (num_query_groups = HF num_key_value_heads, kv_channels = head_dim)."""

    hidden_size: int
    num_attention_heads: int
    num_layers: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None   # None: multi-head attention (NeMo's default = num_attention_heads)
    kv_channels: Optional[int] = None        # None: hidden // heads (peft_config._calculate_kv_channels)
    activation: str = "fast-swiglu"
    share_embeddings_and_output_weights: bool = True  # NeMo's default: megatron_gpt_model.py cfg.get(..., True)
    transformer_engine: bool = False  # TE spec fuses the norms into linear_qkv / linear_fc1 (their key names)

    def __post_init__(self):
        # Frozen: normalise the two defaults once, so every user reads the same numbers.
        for name in ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), f"model.{name}"))
        groups = self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads
        object.__setattr__(self, "num_query_groups", _positive_int(groups, "model.num_query_groups"))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError("model.num_query_groups", f"{self.num_query_groups} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("model.kv_channels", f"null, and hidden_size={self.hidden_size} is not divisible by "
                                  f"num_attention_heads={self.num_attention_heads}; set kv_channels")
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "kv_channels", _positive_int(self.kv_channels, "model.kv_channels"))

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_size(self) -> int:
        """Width of all query heads: NeMo's projection_size, linear_proj's input."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def gated(self) -> bool:
        """fc1 is [gate; up] (megatron_base_model.py: gated_linear_unit = activation.endswith('glu'))."""
        return str(self.activation).endswith("glu")

    @property
    def fc1_size(self) -> int:
        return 2 * self.ffn_hidden_size if self.gated else self.ffn_hidden_size

    @classmethod
    def from_nemo_config(cls, cfg: dict) -> "ModelSpec":
        cfg = _model_section(cfg)
        for key in ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size"):
            if cfg.get(key) is None:
                raise ConfigError(f"model.{key}", "missing from model_config.yaml")
        return cls(
            hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
            num_layers=cfg["num_layers"], ffn_hidden_size=cfg["ffn_hidden_size"],
            num_query_groups=cfg.get("num_query_groups"), kv_channels=cfg.get("kv_channels"),
            activation=str(cfg.get("activation", "gelu")),
            share_embeddings_and_output_weights=bool(cfg.get("share_embeddings_and_output_weights", True)),
            transformer_engine=bool(cfg.get("transformer_engine", False)),
        )


@dataclass
class AdapterSpec:
    """A PEFT adapter of a ModelSpec: which scheme(s), the LoRA settings, and the TP/PP it was saved with.

    layer_selection maps a scheme to the 1-based global layer numbers NeMo gave adapters
    (nlp_adapter_mixins.py: `layer.layer_number in layer_selection`); a scheme not in it covers all layers.
    """

    model: ModelSpec
    schemes: tuple = ("lora",)
    tp: int = 1
    pp: int = 1
    # LoRA (lora, qlora): peft.lora_tuning
    adapter_dim: Optional[int] = None
    alpha: Optional[float] = None           # None: adapter_dim (peft_config.py: lora_cfg.get("alpha", adapter_dim))
    targets: tuple = ("attention_qkv",)     # NeMo's default (peft_config.get_target_modules)
    lora_dropout: float = 0.0
    # canonical adapters: peft.adapter_tuning
    adapter_tuning_dim: Optional[int] = None
    adapter_norm: bool = True               # norm_position pre/post gives the adapter a layer_norm (weight, bias)
    # p-tuning: peft.p_tuning
    virtual_tokens: Optional[int] = None
    bottleneck_dim: Optional[int] = None
    embedding_dim: Optional[int] = None
    layer_selection: dict = field(default_factory=dict)

    def __post_init__(self):
        self.schemes = tuple(self.schemes)
        for scheme in self.schemes:
            if scheme not in EXPORTABLE_SCHEMES:
                raise ConfigError("model.peft.peft_scheme", f"{scheme!r} cannot be exported; expected some of "
                                  f"{', '.join(EXPORTABLE_SCHEMES)}")
        self.tp = _positive_int(self.tp, "model.tensor_model_parallel_size")
        self.pp = _positive_int(self.pp, "model.pipeline_model_parallel_size")
        if self.has_lora:
            self.targets = tuple(lora_targets(self.targets))
            if self.adapter_dim is None:
                raise ConfigError("model.peft.lora_tuning.adapter_dim", "missing")
            self.adapter_dim = _positive_int(self.adapter_dim, "model.peft.lora_tuning.adapter_dim")
            self.alpha = _number(self.adapter_dim if self.alpha is None else self.alpha,
                                 "model.peft.lora_tuning.alpha")
            if "mlp_fc1" in self.targets and self.model.gated and self.model.activation not in FAST_GATED:
                # NeMo doubles the fc1 adapter only for fast-* activations (peft_config.py fast_glu_activation),
                # so a LoRA on a gated fc1 with e.g. "swiglu" has half the rows the base adds to: NeMo crashes.
                raise ConfigError("model.activation", f"{self.model.activation!r} with LoRA on mlp_fc1: NeMo builds a "
                                  f"{self.model.ffn_hidden_size}-row fc1 adapter for a "
                                  f"{self.model.fc1_size}-row gated fc1; use one of {', '.join(FAST_GATED)}")
        if "adapter" in self.schemes:
            if self.adapter_tuning_dim is None:
                raise ConfigError("model.peft.adapter_tuning.adapter_dim", "missing")
            self.adapter_tuning_dim = _positive_int(self.adapter_tuning_dim, "model.peft.adapter_tuning.adapter_dim")
        if "ptuning" in self.schemes:
            for name in ("virtual_tokens", "bottleneck_dim", "embedding_dim"):
                if getattr(self, name) is None:
                    raise ConfigError(f"model.peft.p_tuning.{name}", "missing")
                setattr(self, name, _positive_int(getattr(self, name), f"model.peft.p_tuning.{name}"))
        self.layer_selection = {s: tuple(int(n) for n in layers) for s, layers in self.layer_selection.items()
                                if layers is not None}
        for scheme, layers in self.layer_selection.items():
            bad = [n for n in layers if not 1 <= n <= self.model.num_layers]
            if bad:
                raise ConfigError(f"model.peft.{SCHEME_SECTION.get(scheme, scheme)}.layer_selection",
                                  f"{bad} outside 1..{self.model.num_layers} (NeMo numbers layers from 1)")
        check_layout(self, self.tp, self.pp)

    @property
    def has_lora(self) -> bool:
        return "lora" in self.schemes or "qlora" in self.schemes

    @property
    def scale(self) -> float:
        """The factor NeMo's LoRA forward multiplies by (parallel_adapters.py: x * (self.alpha / self.dim))."""
        return self.alpha / self.adapter_dim

    def layers_of(self, scheme: str) -> list:
        """0-based global layers that carry this scheme's adapters."""
        key = "lora" if scheme == "qlora" else scheme
        chosen = self.layer_selection.get(key) or self.layer_selection.get(scheme)
        if chosen is None:
            return list(range(self.model.num_layers))
        return sorted({n - 1 for n in chosen})

    @classmethod
    def from_nemo_config(cls, cfg: dict) -> "AdapterSpec":
        """From a .nemo's model_config.yaml (the `model` section, or a dict holding it under "model")."""
        cfg = _model_section(cfg)
        model = ModelSpec.from_nemo_config(cfg)
        _refuse_unsupported_layout(cfg)
        peft = cfg.get("peft") or {}
        raw_scheme = peft.get("peft_scheme", "none")
        schemes = tuple(schemes_of(raw_scheme or "none"))
        if schemes == ("none",):
            raise ConfigError("model.peft.peft_scheme", "none: a full fine-tune has no adapter to export")
        if "selective" in schemes:
            raise ConfigError("model.peft.peft_scheme", "selective tuning trains slices of the base weights; "
                              "export its checkpoint as a base model, not an adapter")
        kwargs: dict = {"layer_selection": {}}
        if "lora" in schemes or "qlora" in schemes:
            lora = peft.get("lora_tuning") or {}
            if lora.get("variant", "nemo") != "nemo":
                raise ConfigError("model.peft.lora_tuning.variant", f"{lora.get('variant')!r}: only NeMo's fused "
                                  "'nemo' variant (lora_kqv_adapter, lora_hto4h_adapter) is supported")
            if lora.get("weight_tying", False):
                raise ConfigError("model.peft.lora_tuning.weight_tying", "true: tied LoRA weights (one adapter shared "
                                  "by all layers, plus position embeddings) cannot be exported")
            kwargs.update(adapter_dim=lora.get("adapter_dim"), alpha=lora.get("alpha"),
                          targets=tuple(lora.get("target_modules") or ("attention_qkv",)),
                          lora_dropout=_number(lora.get("adapter_dropout", 0.0) or 0.0,
                                               "model.peft.lora_tuning.adapter_dropout"))
            kwargs["layer_selection"]["lora"] = lora.get("layer_selection")
        if "ia3" in schemes:
            kwargs["layer_selection"]["ia3"] = (peft.get("ia3_tuning") or {}).get("layer_selection")
        if "adapter" in schemes:
            adapter = peft.get("adapter_tuning") or {}
            if adapter.get("weight_tying", False):
                raise ConfigError("model.peft.adapter_tuning.weight_tying", "true: tied adapters cannot be exported")
            norm_position = adapter.get("norm_position", "pre")
            kwargs.update(adapter_tuning_dim=adapter.get("adapter_dim"),
                          adapter_norm=norm_position in ("pre", "post"))
            kwargs["layer_selection"]["adapter"] = adapter.get("layer_selection")
        if "ptuning" in schemes:
            pt = peft.get("p_tuning") or {}
            kwargs.update(virtual_tokens=pt.get("virtual_tokens"), bottleneck_dim=pt.get("bottleneck_dim"),
                          embedding_dim=pt.get("embedding_dim"))
        return cls(model=model, schemes=schemes,
                   tp=cfg.get("tensor_model_parallel_size", 1) or 1,
                   pp=cfg.get("pipeline_model_parallel_size", 1) or 1, **kwargs)


def _model_section(cfg: dict) -> dict:
    if not isinstance(cfg, dict):
        raise ConfigError("model", f"expected the model_config.yaml mapping, got {type(cfg).__name__}")
    if "hidden_size" not in cfg and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    return cfg


def _refuse_unsupported_layout(cfg: dict) -> None:
    # Layer offsets below assume NeMo's even split (mcore offsets layers by num_layers // pp * pp_rank);
    # these keys make stages uneven or interleave them, so stage-local numbers would map to wrong layers.
    for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                "virtual_pipeline_model_parallel_size"):
        if cfg.get(key) is not None:
            raise ConfigError(f"model.{key}", f"{cfg[key]!r}: only an even pipeline split without virtual stages "
                              "is supported")
    for key in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if cfg.get(key):
            raise ConfigError(f"model.{key}", "true: only an even pipeline split is supported")
    if cfg.get("num_moe_experts"):
        raise ConfigError("model.num_moe_experts", f"{cfg['num_moe_experts']}: MoE adapters are not supported")


def check_layout(spec: AdapterSpec, tp: int, pp: int) -> None:
    """Refuse a TP/PP that NeMo could not have saved this adapter with (or that we could not split it into)."""
    m = spec.model
    tp_key, pp_key = "model.tensor_model_parallel_size", "model.pipeline_model_parallel_size"
    if m.num_layers % pp:
        raise ConfigError(pp_key, f"{pp} does not divide num_layers={m.num_layers}; only an even pipeline split "
                          "is supported")
    for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.num_query_groups),
                        ("ffn_hidden_size", m.ffn_hidden_size), ("hidden_size", m.hidden_size)):
        if value % tp:
            raise ConfigError(tp_key, f"{tp} does not divide {name}={value}")
    if spec.has_lora and spec.adapter_dim % tp:
        # Column-parallel targets split A's rows (the rank) across TP ranks.
        raise ConfigError("model.peft.lora_tuning.adapter_dim", f"{spec.adapter_dim} is not divisible by "
                          f"tensor_model_parallel_size={tp}: NeMo splits the LoRA rank across TP ranks")
    if "adapter" in spec.schemes and spec.adapter_tuning_dim % tp:
        raise ConfigError("model.peft.adapter_tuning.adapter_dim", f"{spec.adapter_tuning_dim} is not divisible by "
                          f"tensor_model_parallel_size={tp}")
    if "ptuning" in spec.schemes and spec.bottleneck_dim % tp:
        raise ConfigError("model.peft.p_tuning.bottleneck_dim", f"{spec.bottleneck_dim} is not divisible by "
                          f"tensor_model_parallel_size={tp}")


__all__ = ["ModelSpec", "AdapterSpec", "check_layout", "EXPORTABLE_SCHEMES"]
