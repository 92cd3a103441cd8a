"""Memory and parallelism planner: will this layout fit on these GPUs, and if not, which one does?

Pure Python (no torch, NeMo or Megatron import), so `nemo-ft plan` answers in milliseconds before a
job is queued, and `nemo-ft sft` can refuse a layout that cannot fit before building the model.
"""
from nemo_ft.plan.memory import Dtypes, Layout, MemoryPlan, Mode, estimate_layout
from nemo_ft.plan.planner import (check_fits, count_trainable, estimate, layout_overrides, misfit_message, nearest_fit,
                                  search,
                                  throughput_score)
from nemo_ft.plan.shapes import ModelShape, hf_lora_count, model_shape

__all__ = [
    "Dtypes", "Layout", "MemoryPlan", "Mode", "ModelShape", "check_fits", "count_trainable", "estimate",
    "estimate_layout", "hf_lora_count", "layout_overrides", "misfit_message", "model_shape", "nearest_fit", "search",
    "throughput_score",
]
