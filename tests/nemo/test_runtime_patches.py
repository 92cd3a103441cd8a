"""Every symbol nemo_ft.runtime patches must still exist in the pinned stack, and the patches must work.

An upgrade of NeMo/megatron-core/torch that renames or removes a patched symbol fails here, instead
of leaving a patch that silently does nothing.
"""
import importlib
import inspect
import os

import pytest

os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")

from nemo_ft.runtime import patches  # noqa: E402

ALL = (patches.NEMO_FIXES + patches.CPU_PATCHES + patches.HF_FIXES + patches.ALIGNER_FIXES
       + patches.ALIGNER_CPU_PATCHES + patches.RLHF_FIXES + patches.RLHF_CPU_PATCHES + patches.TOKEN_MEAN_LOSS)
RLHF = {p.target for p in patches.RLHF_FIXES + patches.RLHF_CPU_PATCHES}


@pytest.mark.parametrize("patch", ALL, ids=[p.target for p in ALL])
def test_patch_target_exists(patch):
    if patch.target in RLHF:  # the RLHF modules import the actor, which needs the TensorRT-LLM stand-in
        patches.install_stubs(patches.RLHF_STUBS)
    module_name, _, attr_path = patch.target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for name in parents:
        owner = getattr(owner, name)  # the owner must exist, even where the attribute is the bug
    if patch.missing_ok:
        # These patches supply a name NeMo uses but defines only when apex is importable.
        source = inspect.getsource(importlib.import_module(module_name))
        assert attr in source, f"{module_name} no longer uses {attr}: drop the patch"
    else:
        assert hasattr(owner, attr), f"{patch.target} is gone: the patch would do nothing"
    assert patch.why


def test_lora_mixin_still_has_the_inference_context_bug():
    """The day NeMo's mixin accepts megatron-core's keyword, our fix must be revisited."""
    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin
    from megatron.core.transformer.attention import SelfAttention
    assert "inference_context" in inspect.signature(SelfAttention.forward).parameters
    original = patches._APPLIED.get(patches.NEMO_FIXES[0].target, (None, None, MCoreSelfAttentionMixin.forward))[2]
    assert "inference_context" not in inspect.signature(original).parameters


def test_cpu_patches_route_cuda_requests_to_cpu():
    import torch
    patches.apply(patches.CPU_PATCHES)
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core.fusions import fused_softmax
    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool and mask[0, 1] and not mask[1, 0]
    # The CUDA RNG API now drives the CPU generator: same seed, same draws.
    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    torch.cuda.set_rng_state(torch.cuda.get_rng_state())
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(3))


def test_torch_grad_clipping_matches_torch_reference():
    import torch
    clip = patches._torch_clip_grad_norm(None)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    ref = [p.grad.clone() for p in params]
    expected_norm = torch.sqrt(sum((g ** 2).sum() for g in ref)).item()
    norm = clip(params, max_norm=1.0)
    assert norm == pytest.approx(expected_norm, rel=1e-5)
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_packed_rope_in_one_pass_equals_megatrons_per_example_loop():
    """The vectorized THD RoPE must give megatron's own per-example result."""
    import torch
    from megatron.core.models.common.embeddings import rope_utils

    patch = next(p for p in patches.NEMO_FIXES if p.target.endswith(":_apply_rotary_pos_emb_thd"))
    original = patches._APPLIED.get(patch.target, (None, None, rope_utils._apply_rotary_pos_emb_thd))[2]
    fast = patch.make(original)

    class OneRank:  # what megatron's cp_group answers without context parallelism
        def size(self):
            return 1

        def rank(self):
            return 0

    torch.manual_seed(0)
    t = torch.randn(40, 4, 16)
    freqs = torch.randn(40, 1, 1, 16)  # max_seqlen 40
    for cu in ([0, 40], [0, 7, 8, 25, 40], [0, 32, 40]):
        cu = torch.tensor(cu, dtype=torch.int32)
        want = original(t, cu, freqs, cp_group=OneRank())
        got = fast(t, cu, freqs, cp_group=OneRank())
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Positions restart in every example: token 7 (first of the second example) gets angle 0.
    cu = torch.tensor([0, 7, 40], dtype=torch.int32)
    got = fast(t, cu, freqs, cp_group=OneRank())
    torch.testing.assert_close(got[7:8], fast(t[7:8], torch.tensor([0, 1]), freqs, cp_group=OneRank()))
    assert not torch.allclose(got[7:8], fast(t, torch.tensor([0, 40]), freqs, cp_group=OneRank())[7:8])


def test_hf_fix_lets_transformers_convert_the_tiny_tokenizer_beside_nemos_protobuf():
    """Without the fix the conversion fails on sentencepiece's bundled pb2 (protobuf gencode/runtime)."""
    import sentencepiece as spm

    from nemo_ft.paths import DATA_DIR
    patches.apply(patches.HF_FIXES)
    from transformers.convert_slow_tokenizer import import_protobuf
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((DATA_DIR / "tiny" / "tokenizer.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(DATA_DIR / "tiny" / "tokenizer.model"))
    assert len(proto.pieces) == sp.get_piece_size() and proto.pieces[5].piece == sp.id_to_piece(5)
    assert proto.normalizer_spec.name == "identity"  # the Llama-style recipe HF's converter reproduces


def test_scalar_adam_state_survives_sharding_and_the_live_optimizer_is_untouched():
    """torch Adam's 0-d `step` cannot become a ShardedTensor (megatron asserts shapes): it stays plain
    (common) state in the checkpoint, and the optimizer keeps training (its own state dicts untouched)."""
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import optim_state_to_sharding_state

    patch = next(p for p in patches.NEMO_FIXES if p.target.endswith(":optim_state_to_sharding_state"))
    fixed = patch.make(optim_state_to_sharding_state)
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([w])
    w.grad = torch.ones_like(w)
    opt.step()
    sd = opt.state_dict()
    sharded = {0: ShardedTensor.from_rank_offsets("w", w.detach())}
    with pytest.raises(Exception):  # megatron's own: the 0-d step does not match the parameter's shape
        optim_state_to_sharding_state(opt.state_dict(), sharded)
    fixed(sd, sharded)
    assert isinstance(sd["state"][0]["exp_avg"], ShardedTensor) and sd["state"][0]["step"].dim() == 0
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}  # the live state still has its step
    opt.step()  # and trains on


def test_the_actors_need_the_trt_llm_stand_in_and_it_refuses_clearly():
    """Aligner's trt_llm module imports tensorrt_llm unguarded, so without the stand-in the REINFORCE actor
    cannot be imported at all; with it the actor imports, and asking for TensorRT-LLM says what to set."""
    import subprocess
    import sys

    actor = "nemo_aligner.models.nlp.gpt.megatron_gpt_reinforce_actor"
    bare = subprocess.run([sys.executable, "-c", f"import {actor}"], capture_output=True, text=True,
                          env={**os.environ, "NVIDIA_PYTORCH_VERSION": "24.07"}, timeout=300)
    assert bare.returncode != 0 and "No module named 'tensorrt_llm'" in bare.stderr, bare.stderr[-2000:]
    stubbed = ("from nemo_ft.runtime import patches; assert patches.install_stubs(patches.RLHF_STUBS) == "
               f"['nemo_aligner.utils.trt_llm']; import {actor} as a; print(a.MegatronGPTReinforceActorModel.__name__)")
    ok = subprocess.run([sys.executable, "-c", stubbed], capture_output=True, text=True,
                        env={**os.environ, "NVIDIA_PYTORCH_VERSION": "24.07"}, timeout=300)
    assert ok.returncode == 0 and "MegatronGPTReinforceActorModel" in ok.stdout, ok.stderr[-2000:]
    stub = patches.RLHF_STUBS[0].make()
    with pytest.raises(RuntimeError, match="trt_llm.enable=false"):
        stub.GPTGenerateTRTLLM(None)


def _rebalance_rank(rank, port, sizes, out):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(sizes))
    try:
        patches.apply(patches.CPU_PATCHES)  # the original asks torch.cuda.current_device()
        from nemo_aligner.utils import distributed
        mine = torch.arange(sizes[rank] * 3, dtype=torch.float32).reshape(sizes[rank], 3) + 100 * rank
        try:
            distributed.rebalance_nd_tensor(mine, dist.group.WORLD)
            out[f"original{rank}"] = "ran"
        except Exception as e:  # noqa: BLE001 (what gloo says is the point)
            out[f"original{rank}"] = str(e)
        fixed = patches._rebalance_with_1d_count(None)(mine, dist.group.WORLD)
        out[f"fixed{rank}"] = fixed.tolist()
    finally:
        dist.destroy_process_group()


def test_rollout_rebalancing_over_gloo_gathers_uneven_batches_in_rank_order():
    """Aligner's rebalance_nd_tensor all-gathers a 0-d count (gloo refuses it); ours gives the rows of
    every rank, in rank order, on every rank, for uneven batch sizes."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [2, 3]
    out = mp.Manager().dict()
    mp.spawn(_rebalance_rank, args=(port, sizes, out), nprocs=2, join=True)
    want = torch.cat([torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * r
                      for r, n in enumerate(sizes)]).tolist()
    assert out["fixed0"] == want and out["fixed1"] == want
    assert out["original0"] != "ran" and "gloo" in out["original0"].lower(), out["original0"]


def test_critic_state_copies_work_without_pinned_memory_and_equal_the_model():
    """Aligner's copy_model_states_to_cpu asks for pinned memory, which a CPU-only torch refuses; with the
    patch the copy is made (unpinned) by Aligner's own function and equals the model's state."""
    import torch

    patches.install_stubs(patches.RLHF_STUBS)
    from nemo_aligner.utils import utils

    patch = next(p for p in patches.RLHF_CPU_PATCHES if p.target == "nemo_aligner.utils.utils:copy_model_states_to_cpu")
    original = patches._APPLIED.get(patch.target, (None, None, utils.copy_model_states_to_cpu))[2]
    model = torch.nn.Linear(3, 2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="pin"):
            original(model, megatron_amp_O2=False, sync=False)
    copy = patch.make(original)(model, None, megatron_amp_O2=False, sync=False)
    assert set(copy) == {"weight", "bias"}
    assert all(torch.equal(copy[k], v) and copy[k].data_ptr() != v.data_ptr() for k, v in model.state_dict().items())
    again = patch.make(original)(model, copy, megatron_amp_O2=False, sync=False)  # reuses the buffers
    assert again["weight"].data_ptr() == copy["weight"].data_ptr()


def _original(target):
    patch = next(p for p in ALL if p.target == target)
    return patches._APPLIED.get(target, patch.resolve())[2], patch


def test_torch_norm_still_refuses_sequence_parallel_and_the_patch_tags_it_like_apex():
    from types import SimpleNamespace

    import torch
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original, patch = _original("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__")
    config = SimpleNamespace(layernorm_zero_centered_gamma=False, persist_layer_norm=False, sequence_parallel=True,
                             memory_efficient_layer_norm=False, normalization="RMSNorm")
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        original(WrappedTorchNorm, config, 8)
    norm = patch.make(original).__func__(WrappedTorchNorm, config, 8)
    assert isinstance(norm, torch.nn.RMSNorm) and config.sequence_parallel is True  # config given back as it was
    assert [getattr(p, "sequence_parallel", None) for p in norm.parameters()] == [True]


def test_global_token_loss_divides_by_the_tokens_per_micro_batch_of_the_whole_batch():
    import torch

    original, patch = _original("nemo.collections.nlp.models.language_modeling.megatron_gpt_model:"
                                "MegatronGPTModel.loss_func")
    loss_func = patch.make(original)
    mask, per_token = torch.tensor([[1.0, 1.0, 0.0, 1.0]]), torch.tensor([[2.0, 4.0, 100.0, 6.0]])
    model = type("M", (), {})()
    assert float(loss_func(model, mask, mask.sum(), per_token)) == pytest.approx(4.0)  # NeMo's: its own mean
    model._nemo_ft_tokens_per_ub = 6.0  # e.g. 24 loss tokens in the global batch, 4 micro batches
    assert float(loss_func(model, mask, mask.sum(), per_token)) == pytest.approx(12.0 / 6.0)
