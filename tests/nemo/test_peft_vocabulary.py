"""nemo_ft.peft (the one PEFT vocabulary) names what the installed NeMo 2.4.1 really has."""
import os

os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.07")


def test_schemes_and_targets_are_nemos():
    from nemo.collections.nlp.parts import peft_config

    from nemo_ft import peft
    assert set(peft.PEFT_SCHEMES) <= set(peft_config.PEFT_CONFIG_MAP)
    module_map = peft_config.PEFT_MODULE_MAP
    assert [module_map[k] for k in ("qkv_module", "dense_module", "hto4h_module", "4htoh_module")] == list(peft.LORA_TARGETS)
    assert {module_map[g] for g in ("attention", "mlp", "all")} == set(peft.LORA_TARGET_GROUPS)


def test_adapter_module_names_are_the_ones_nemo_saves():
    from nemo.collections.nlp.modules.common.megatron.adapters import parallel_adapters as pa

    from nemo_ft import peft
    names = {t: m.rsplit(".", 1)[-1] for t, (m, _, _) in peft.LORA_MODULES.items()}
    assert names == {"attention_qkv": pa.AdapterName.LORA_KQV_ADAPTER, "attention_dense": pa.AdapterName.LORA_DENSE_ATTENTION_ADAPTER,
                     "mlp_fc1": pa.AdapterName.LORA_Hto4H_ADAPTER, "mlp_fc2": pa.AdapterName.LORA_4HtoH_ADAPTER}
