"""nemo_ft.export's NeMo <-> HF Llama and NeMo LoRA -> HF PEFT mappings against real transformers and peft.

No NeMo here: a random-init GQA LlamaForCausalLM (4 heads, 2 kv heads, head_dim 32, hidden 128,
2 layers, vocab 512, weights and norms scaled up so a k/v or gate/up mix-up moves the logits a lot)
is mapped to NeMo's layout and back, and a random NeMo-layout LoRA (all four targets, alpha != r)
is both merged (core merge, then mapped) and exported as an HF PEFT adapter loaded by peft.
To tie the NeMo layout to what megatron-core computes (and not only to its own inverse), the
NeMo-layout weights also run through a transcription of mcore's forward (qkv viewed per query group
then split [q heads, k, v] as in mcore_mixins.py 164-203; k/v repeat_interleave'd per group as in
dot_product_attention.py 137-140; RoPE rotate_half as rope_utils.py 78-80; GLU chunks fc1 gate-first).
All fp32 on CPU; tolerances are stated per comparison.
"""
import json
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from nemo_ft.export import (  # noqa: E402
    AdapterSpec, ModelSpec, expected_keys, hf_llama_config, hf_peft_adapter_config, hf_to_nemo_llama,
    lora_to_hf_peft, merge_lora, nemo_config_from_hf, nemo_to_hf_llama,
)
from nemo_ft.peft import LORA_TARGETS  # noqa: E402

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 128, 192, 2, 4, 2, 32
R, ALPHA = 8, 32.0  # scale 4: a merge that forgets alpha / r is off by 4x


@pytest.fixture(scope="module")
def hf_model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so input/post-attention norm mix-ups show
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:               # std 0.1 instead of 0.02: attention far from uniform
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def spec(hf_model):
    fields = nemo_config_from_hf(hf_model.config.to_dict())
    return ModelSpec.from_nemo_config(fields)


def hf_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load_hf(config, state: dict):
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return model


def ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def lora_spec(model: ModelSpec) -> AdapterSpec:
    return AdapterSpec(model=model, schemes=("lora",), adapter_dim=R, alpha=ALPHA, targets=LORA_TARGETS)


def random_lora(spec: AdapterSpec) -> dict:
    rng = np.random.default_rng(3)
    return {k: (0.1 * rng.standard_normal(p.shape)).astype(np.float32) for k, p in expected_keys(spec).items()}


# ------------------------------------------------------------------------------------------ mcore transcription

def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta=10000.0):
    # x [b, s, heads, hd]; megatron: emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def mcore_forward(nemo: dict, model: ModelSpec, adapter: dict = None, scale: float = 1.0):
    """Logits of megatron-core's GPT on NeMo-layout weights (local spec names), LoRA applied unmerged."""
    w = {k.removeprefix("model."): torch.from_numpy(np.ascontiguousarray(v)) for k, v in nemo.items()}
    lw = {k.removeprefix("model."): torch.from_numpy(v) for k, v in (adapter or {}).items()}

    def linear(x, layer, base, lora_module):
        y = x @ w[f"decoder.layers.{layer}.{base}.weight"].T
        a = lw.get(f"decoder.layers.{layer}.{lora_module}.linear_in.weight")
        if a is not None:
            y = y + scale * ((x @ a.T) @ lw[f"decoder.layers.{layer}.{lora_module}.linear_out.weight"].T)
        return y

    ng, per, hd = model.num_query_groups, model.heads_per_group, model.head_dim
    tokens = ids()
    b, s = tokens.shape
    h = w["embedding.word_embeddings.weight"][tokens]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for n in range(model.num_layers):
        x = _rms(h, w[f"decoder.layers.{n}.input_layernorm.weight"])
        qkv = linear(x, n, "self_attention.linear_qkv", "self_attention.adapter_layer.lora_kqv_adapter")
        qkv = qkv.view(b, s, ng, (per + 2) * hd)
        q, k, v = torch.split(qkv, [per * hd, hd, hd], dim=3)
        q = _rope(q.reshape(b, s, -1, hd))
        k = _rope(k).repeat_interleave(per, dim=2)
        v = v.repeat_interleave(per, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5 + mask
        ctx = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, s, -1)
        h = h + linear(ctx, n, "self_attention.linear_proj",
                       "self_attention.adapter_layer.lora_dense_attention_adapter")
        x = _rms(h, w[f"decoder.layers.{n}.pre_mlp_layernorm.weight"])
        gate, up = torch.chunk(linear(x, n, "mlp.linear_fc1", "mlp.adapter_layer.lora_hto4h_adapter"), 2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        h = h + linear(act, n, "mlp.linear_fc2", "mlp.adapter_layer.lora_4htoh_adapter")
    h = _rms(h, w["decoder.final_layernorm.weight"])
    return h @ w["output_layer.weight"].T


# ------------------------------------------------------------------------------------------ (a) base mapping

def test_hf_to_nemo_to_hf_is_bit_exact_and_config_rebuilds_the_model(hf_model, spec):
    state = hf_state(hf_model)
    nemo = hf_to_nemo_llama(state, spec)
    assert nemo["model.decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM,
                                                                                      HIDDEN)
    back = nemo_to_hf_llama(nemo, spec)
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key]), key  # bit-exact
    # config.json from the NeMo fields builds the same model: identical logits (exact: same weights, same math)
    fields = dict(nemo_config_from_hf(hf_model.config.to_dict()), bias=False)
    cfg = hf_llama_config(fields, vocab_size=VOCAB, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    rebuilt = load_hf(transformers.LlamaConfig(**json.loads(json.dumps(cfg))), back)
    assert torch.equal(logits(rebuilt), logits(hf_model))


def test_nemo_layout_computes_in_mcore_what_hf_computes(hf_model, spec):
    # atol 1e-4 on logits up to ~5 (seen: 4e-6): two fp32 implementations of the same math.
    nemo = hf_to_nemo_llama(hf_state(hf_model), spec)
    ref = logits(hf_model)
    got = mcore_forward(nemo, spec)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert ref.abs().max() > 1.0


# ------------------------------------------------------------------------------------------ (b) LoRA -> HF PEFT

def save_peft(tmp_path, tensors: dict, adapter_config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return tmp_path


def load_peft(hf_model, adapter_dir):
    base = load_hf(hf_model.config, hf_state(hf_model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    return model, key_warnings


def test_nemo_lora_as_hf_peft_matches_core_merge(hf_model, spec, tmp_path):
    aspec = lora_spec(spec)
    adapter = random_lora(aspec)
    tensors = lora_to_hf_peft(adapter, aspec)
    adapter_dir = save_peft(tmp_path / "adapter", tensors, hf_peft_adapter_config(aspec, str(tmp_path / "base")))
    model, key_warnings = load_peft(hf_model, adapter_dir)
    assert key_warnings == []  # no "Found missing adapter keys"
    # every saved tensor landed in the model and every LoRA weight of the model came from the file
    loaded = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(tensors) == LAYERS * 7 * 2
    for key, value in tensors.items():
        name = re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", key)  # peft adds the adapter name
        assert np.array_equal(loaded[name].numpy(), value), key

    merged_nemo = merge_lora(hf_to_nemo_llama(hf_state(hf_model), spec), adapter, aspec)
    merged = load_hf(hf_model.config, nemo_to_hf_llama(merged_nemo, spec))
    peft_logits, merged_logits = logits(model), logits(merged)
    # 1e-4 absolute on logits up to ~5 (seen: 2.3e-5; fp32 W + s*B@A vs W x + s*B(A x))
    torch.testing.assert_close(peft_logits, merged_logits, rtol=0, atol=1e-4)
    assert (merged_logits - logits(hf_model)).abs().max() > 1.0  # the adapter does change the model
    # and both equal megatron-core's unmerged LoRA forward on the NeMo layout (same tolerance; seen 6e-6)
    nemo_ref = mcore_forward(hf_to_nemo_llama(hf_state(hf_model), spec), spec, adapter, aspec.scale)
    torch.testing.assert_close(peft_logits, nemo_ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ (c) the tests can fail

def test_swapped_k_v_would_be_caught(hf_model, spec, tmp_path):
    # base: swapping k_proj and v_proj in the mapped state changes the logits far beyond the 1e-4 above
    state = nemo_to_hf_llama(hf_to_nemo_llama(hf_state(hf_model), spec), spec)
    for n in range(LAYERS):
        k, v = f"model.layers.{n}.self_attn.k_proj.weight", f"model.layers.{n}.self_attn.v_proj.weight"
        state[k], state[v] = state[v], state[k]
    assert (logits(load_hf(hf_model.config, state)) - logits(hf_model)).abs().max() > 0.1

    # adapter: a k/v swap of the LoRA B rows no longer matches the merge
    aspec = lora_spec(spec)
    adapter = random_lora(aspec)
    tensors = lora_to_hf_peft(adapter, aspec)
    for n in range(LAYERS):
        p = f"base_model.model.model.layers.{n}.self_attn."
        tensors[p + "k_proj.lora_B.weight"], tensors[p + "v_proj.lora_B.weight"] = \
            tensors[p + "v_proj.lora_B.weight"], tensors[p + "k_proj.lora_B.weight"]
    model, _ = load_peft(hf_model, save_peft(tmp_path / "swapped", tensors,
                                             hf_peft_adapter_config(aspec, "base")))
    merged = load_hf(hf_model.config, nemo_to_hf_llama(
        merge_lora(hf_to_nemo_llama(hf_state(hf_model), spec), adapter, aspec), spec))
    assert (logits(model) - logits(merged)).abs().max() > 0.1

    # the mcore transcription itself tells a k/v-swapped NeMo layout apart from HF
    nemo = hf_to_nemo_llama(hf_state(hf_model), spec)
    for n in range(LAYERS):
        key = f"model.decoder.layers.{n}.self_attention.linear_qkv.weight"
        w = nemo[key].reshape(KV_HEADS, HEADS // KV_HEADS + 2, HEAD_DIM, HIDDEN).copy()
        w[:, [-2, -1]] = w[:, [-1, -2]]
        nemo[key] = w.reshape(-1, HIDDEN)
    assert (mcore_forward(nemo, spec) - logits(hf_model)).abs().max() > 0.1
