"""Parameter counts of a Megatron GPT model and of each NeMo PEFT scheme, from the model's real shapes.

Pure arithmetic on the `model.*` keys (NeMo's names). The counts mirror how NeMo 2.4 / megatron-core
build the modules, so `count_trainable` can be asserted equal to the real model's
`sum(p.numel() for p in model.parameters() if p.requires_grad)`:
- mcore GPT layer: fused `linear_qkv` (out = (heads + 2*query_groups) * kv_channels), `linear_proj`,
  `linear_fc1` (out = 2*ffn for gated activations: gate and up fused), `linear_fc2`, two norms.
- LoRA (nemo/collections/nlp/parts/peft_config.py LoraPEFTConfig + ParallelLinearAdapter): per targeted
  matrix linear_in (in x r) and linear_out (r x out), both bias=False, no norm (norm_position=None).
  NeMo doubles the mlp_fc1 adapter's out width only for fast-swiglu / fast-geglu / fast-reglu.
"""
from __future__ import annotations

from dataclasses import dataclass

from nemo_ft import peft as vocab
from nemo_ft.errors import ConfigError
from nemo_ft.peft import FAST_GATED, LORA_TARGETS  # noqa: F401  (FAST_GATED: the only ones NeMo's LoRA doubles fc1 for)

GATED = {"fast-swiglu", "fast-geglu", "fast-reglu", "swiglu", "geglu", "reglu"}
# The schemes the planner can size ("selective" trains a chosen subset of base weights: not modelled).
SIZED_SCHEMES = ("none", "lora", "qlora", "ia3", "adapter", "ptuning")


def _get(node, key, default=None):
    """cfg.get that works for DictConfig, dict and missing sections alike."""
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    make_vocab_size_divisible_by: int
    seq_length: int
    activation: str
    normalization: str
    bias: bool
    tied_embeddings: bool
    learned_positions: bool
    max_position_embeddings: int
    hidden_dropout: float
    attention_dropout: float

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        """Width of K (and of V): smaller than q_size under GQA."""
        return self.num_query_groups * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def fc1_size(self) -> int:
        return self.ffn_hidden_size * (2 if self.gated else 1)

    @property
    def norm_params(self) -> int:
        # RMSNorm has a weight only; LayerNorm / LayerNorm1p a weight and a bias.
        return self.hidden_size * (1 if self.normalization == "rmsnorm" else 2)

    def padded_vocab(self, tp: int) -> int:
        # NeMo's _vocab_size_with_padding: round up to make_vocab_size_divisible_by * TP.
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


def model_shape(model) -> ModelShape:
    """Read the architecture keys of `model.*` (conf/model/*.yaml), with NeMo's defaults."""
    try:
        heads = int(model["num_attention_heads"])
        hidden = int(model["hidden_size"])
        layers = int(model["num_layers"])
        ffn = int(model["ffn_hidden_size"])
    except (KeyError, TypeError) as err:
        raise ConfigError("model", f"missing architecture key {err} (pick a shape with model=llama3_8b etc.)")
    kv = _get(model, "kv_channels")
    if kv is None:
        if hidden % heads:
            raise ConfigError("model.kv_channels", f"hidden_size {hidden} is not divisible by {heads} heads; set kv_channels")
        kv = hidden // heads
    vocab = _get(model, "vocab_size")
    if vocab is None:
        raise ConfigError("model.vocab_size", "the tokenizer's vocabulary size is needed to size the embeddings")
    seq = _get(model, "encoder_seq_length", _get(model, "max_position_embeddings", 2048))
    return ModelShape(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=int(_get(model, "num_query_groups", heads)),
        kv_channels=int(kv),
        vocab_size=int(vocab),
        make_vocab_size_divisible_by=int(_get(model, "make_vocab_size_divisible_by", 128)),
        seq_length=int(seq),
        activation=str(_get(model, "activation", "gelu")),
        normalization=str(_get(model, "normalization", "layernorm")),
        bias=bool(_get(model, "bias", True)),
        tied_embeddings=bool(_get(model, "share_embeddings_and_output_weights", True)),
        learned_positions=_get(model, "position_embedding_type", "learned_absolute") == "learned_absolute",
        max_position_embeddings=int(_get(model, "max_position_embeddings", seq)),
        hidden_dropout=float(_get(model, "hidden_dropout", 0.1)),
        attention_dropout=float(_get(model, "attention_dropout", 0.1)),
    )


# ---- base model -------------------------------------------------------------------------------

def layer_linear_params(s: ModelShape) -> dict[str, int]:
    """Weights (+ biases) of the four GEMMs of one decoder layer, by NeMo's LoRA target name."""
    h = s.hidden_size
    return {
        "attention_qkv": h * s.qkv_size + (s.qkv_size if s.bias else 0),
        "attention_dense": s.q_size * h + (h if s.bias else 0),
        "mlp_fc1": h * s.fc1_size + (s.fc1_size if s.bias else 0),
        "mlp_fc2": s.ffn_hidden_size * h + (h if s.bias else 0),
    }


def layer_params(s: ModelShape) -> int:
    return sum(layer_linear_params(s).values()) + 2 * s.norm_params


def embedding_params(s: ModelShape, tp: int = 1) -> int:
    """Word embeddings (padded vocab x hidden) plus learned positions, if any."""
    return s.padded_vocab(tp) * s.hidden_size + (s.max_position_embeddings * s.hidden_size if s.learned_positions else 0)


def total_params(s: ModelShape, tp: int = 1) -> int:
    """The whole model counted once (as at TP=1 except for the vocab padding, which depends on TP)."""
    output = 0 if s.tied_embeddings else s.padded_vocab(tp) * s.hidden_size
    return embedding_params(s, tp) + s.num_layers * layer_params(s) + s.norm_params + output


# ---- PEFT -------------------------------------------------------------------------------------

def peft_scheme(peft) -> str:
    scheme = str(_get(peft, "peft_scheme", "none")).lower()
    vocab.schemes_of(scheme)  # unknown names: the same message as the stage checks
    if scheme not in SIZED_SCHEMES:
        raise ConfigError("model.peft.peft_scheme", f"the planner sizes {', '.join(SIZED_SCHEMES)}, not {scheme!r}")
    return scheme


def lora_targets(peft) -> list[str]:
    """NeMo's get_target_modules: expand attention / mlp / all, keep order, drop repeats."""
    return vocab.lora_targets(list(_get(_get(peft, "lora_tuning", {}), "target_modules", ["attention_qkv"])))


def lora_matrix_shapes(s: ModelShape, peft) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each targeted matrix, exactly as LoraPEFTConfig passes them."""
    h = s.hidden_size
    fc1_out = s.ffn_hidden_size * 2 if s.activation in FAST_GATED else s.ffn_hidden_size
    shapes = {
        "attention_qkv": (h, s.qkv_size),
        "attention_dense": (s.q_size, h),
        "mlp_fc1": (h, fc1_out),
        "mlp_fc2": (s.ffn_hidden_size, h),
    }
    return {t: shapes[t] for t in lora_targets(peft)}


def lora_rank(peft) -> int:
    return int(_get(_get(peft, "lora_tuning", {}), "adapter_dim", 32))


def _selected_layers(s: ModelShape, tuning) -> int:
    selection = _get(tuning, "layer_selection")
    return s.num_layers if selection is None else len(list(selection))


def trainable_per_layer(s: ModelShape, peft) -> int:
    """Trainable parameters one decoder layer adds (PEFT) or owns (full fine-tuning)."""
    scheme = peft_scheme(peft)
    h = s.hidden_size
    if scheme == "none":
        return layer_params(s)
    if scheme in ("lora", "qlora"):
        r = lora_rank(peft)
        return sum(r * (i + o) for i, o in lora_matrix_shapes(s, peft).values())
    if scheme == "ia3":
        # IA3PEFTConfig: scaling vectors on K and V (kv_size wide) and on the MLP activation (ffn wide);
        # NeMo builds them per TP rank at width/TP, which adds up to the same total.
        return 2 * s.kv_size + s.ffn_hidden_size
    if scheme == "adapter":
        # CanonicalAdaptersPEFTConfig: two ParallelLinearAdapters per layer (pre- and post-attention),
        # h->dim->h without bias, each with a pre LayerNorm (weight and bias over h).
        dim = int(_get(_get(peft, "adapter_tuning", {}), "adapter_dim", 32))
        return 2 * (2 * h * dim + 2 * h)
    return 0  # ptuning lives on the embedding, see count_trainable


def ptuning_params(s: ModelShape, peft) -> int:
    # PromptEncoderAdapter: Embedding(virtual_tokens, embedding_dim), then embedding_dim->bottleneck and
    # bottleneck->hidden, both with bias. Only on the first pipeline stage.
    p = _get(peft, "p_tuning", {})
    tokens, bottleneck = int(_get(p, "virtual_tokens", 10)), int(_get(p, "bottleneck_dim", 1024))
    emb = int(_get(p, "embedding_dim", 1024))
    return tokens * emb + (emb * bottleneck + bottleneck) + (bottleneck * s.hidden_size + s.hidden_size)


def trainable_layers(s: ModelShape, peft) -> int:
    scheme = peft_scheme(peft)
    if scheme in ("lora", "qlora"):
        return _selected_layers(s, _get(peft, "lora_tuning", {}))
    if scheme == "adapter":
        return _selected_layers(s, _get(peft, "adapter_tuning", {}))
    if scheme == "ia3":
        return _selected_layers(s, _get(peft, "ia3_tuning", {}))
    return s.num_layers


def count_trainable_shape(s: ModelShape, peft, tp: int = 1) -> int:
    scheme = peft_scheme(peft)
    if scheme == "none":
        return total_params(s, tp)
    if scheme == "ptuning":
        return ptuning_params(s, peft)
    return trainable_layers(s, peft) * trainable_per_layer(s, peft)


def hf_lora_count(s: ModelShape, rank: int, targets=("q", "k", "v", "o")) -> int:
    """LoRA count the way HF PEFT counts it on unfused q_proj/k_proj/v_proj/o_proj (and gate/up/down).

    Differs from NeMo's fused attention_qkv: one A (h x r) is shared by q, k and v in NeMo, so NeMo's
    count is smaller by 2*h*r per layer.
    """
    h, f = s.hidden_size, s.ffn_hidden_size
    dims = {"q": (h, s.q_size), "k": (h, s.kv_size), "v": (h, s.kv_size), "o": (s.q_size, h),
            "gate": (h, f), "up": (h, f), "down": (f, h)}
    return s.num_layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)
