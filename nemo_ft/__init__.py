"""nemo-ft: fine-tuning pipeline for LLMs on NVIDIA NeMo/Megatron."""
