"""Export's pure core: adapter and checkpoint math on plain numpy arrays.

Gather NeMo's TP x PP PEFT shards into one TP=1 adapter (and split it back), merge LoRA into the base,
map the base between NeMo mcore GPT and HF LlamaForCausalLM (weights and config.json), and map a NeMo
LoRA to HF PEFT. Imports only the standard library, numpy and nemo_ft.errors / nemo_ft.peft: the
export stage converts torch tensors to numpy (bf16 via float32) before calling in, and back after.
"""
from nemo_ft.export.spec import AdapterSpec, ModelSpec, check_layout
from nemo_ft.export.layout import (
    Param, check_adapter, expected_keys, gather_adapter, lora_key, lora_shapes, shard_path, split_adapter,
)
from nemo_ft.export.merge import lora_delta, merge_lora
from nemo_ft.export.hf_llama import (
    check_llama_compatible, fuse_qkv, hf_llama_config, hf_to_nemo_llama, nemo_config_from_hf,
    nemo_to_hf_llama, split_fc1, split_qkv,
)
from nemo_ft.export.hf_peft import (
    HF_LORA_MODULES, hf_peft_adapter_config, hf_peft_shapes, hf_target_modules, lora_to_hf_peft,
)

__all__ = [
    "AdapterSpec", "ModelSpec", "check_layout",
    "Param", "check_adapter", "expected_keys", "gather_adapter", "lora_key", "lora_shapes", "shard_path",
    "split_adapter",
    "lora_delta", "merge_lora",
    "check_llama_compatible", "fuse_qkv", "hf_llama_config", "hf_to_nemo_llama", "nemo_config_from_hf",
    "nemo_to_hf_llama", "split_fc1", "split_qkv",
    "HF_LORA_MODULES", "hf_peft_adapter_config", "hf_peft_shapes", "hf_target_modules", "lora_to_hf_peft",
]
