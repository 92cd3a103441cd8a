"""Per-example losses of packed vs unpacked examples through the real NeMo model (run as a script).

    python tests/e2e/packed_check.py PACKED.npy [N_PACKS] [HYDRA OVERRIDES...]  -> prints one JSON object

(scripts/gpu_packed_check.sh runs it on a GPU with parallel=debug_1gpu.)

Restores the tiny base with the SFT stage's own code path (config composed from conf/sft_lora.yaml,
nemo_ft.runtime, NeMo's restore), then for each of the first N packs of PACKED.npy computes every
example's summed loss three ways: alone (unpacked, plain causal attention), inside its pack with
NeMo's PackedSeqParams (what `packed_sequence=true` trains on), and inside its pack with the
boundaries dropped (the leaky workaround), so the test can show the check is able to fail.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

import nemo_ft.config  # noqa: F401
from nemo_ft.config.validate import validate_sft
from nemo_ft.paths import CONF_DIR


def main(packed_path: str, n_packs: int = 3, overrides=()) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("sft_lora", overrides=["peft=none", "run.dir=/tmp/nemo_ft_packed_check",
                                             "trainer.enable_progress_bar=false", *overrides])
    from nemo_ft.stages import lifecycle, sft

    run = lifecycle.start("sft", cfg, checks=validate_sft, derive=sft.derive, nemo_inputs=sft.NEMO_INPUTS)
    from megatron.core.packed_seq_params import PackedSeqParams
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_dataset import GPTSFTPackedDataset

    model = sft.add_peft(run, run.restore(cfg.model.restore_from_path))
    model.eval()
    gpt = model.model
    dev = next(gpt.parameters()).device
    packs = np.load(packed_path, allow_pickle=True)
    ds = GPTSFTPackedDataset.__new__(GPTSFTPackedDataset)  # only its collate_fn is used
    ds.tokenizer, ds.answer_only_loss, ds.pad_to_max_length = model.tokenizer, True, False
    ds.max_seq_length, ds.pad_seq_length_to_mult, ds.return_cu_seqlen, ds.pad_cu_seqlens = 4096, 16, True, False
    ds.pack_metadata, ds.ceil_to_power_2 = None, False

    alone, packed, leaky = [], [], []
    with torch.no_grad():
        for p in packs[:n_packs]:
            item = {"input_ids": list(p["input_ids"]), "loss_mask": list(p["loss_mask"]),
                    "seq_boundaries": list(p["seq_start_id"]) + [len(p["input_ids"])]}
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in ds.collate_fn([item]).items()}
            cu = batch["cu_seqlens"][0]
            cu = cu[: int(batch["cu_seqlens_argmin"][0])] if "cu_seqlens_argmin" in batch else cu[cu >= 0]
            params = PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                     cu_seqlens_kv_padded=cu, max_seqlen_q=int(batch["max_seqlen"].max()),
                                     max_seqlen_kv=int(batch["max_seqlen"].max()), qkv_format="thd")
            args = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                        labels=batch["labels"])
            per_token = gpt(**args, packed_seq_params=params)[0]
            per_token_leaky = gpt(**args)[0]
            mask = batch["loss_mask"][0].float()
            bounds = cu.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                if mask[a:b].sum() == 0:
                    continue
                packed.append(float((per_token[a:b] * mask[a:b]).sum()))
                leaky.append(float((per_token_leaky[a:b] * mask[a:b]).sum()))
                one = gpt(input_ids=batch["tokens"][:, a:b], position_ids=torch.arange(b - a, device=dev)[None],
                          attention_mask=None, labels=batch["labels"][:, a:b])[0]
                alone.append(float((one * mask[a:b]).sum()))
    return {"alone": alone, "packed": packed, "leaky": leaky, "device": str(dev),
            "attention": os.environ.get("NEMO_FT_PACKED_ATTENTION") or ("mask" if dev.type == "cuda" else "loop")}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3, sys.argv[3:])))
