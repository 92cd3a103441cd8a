"""Data prep core: read, check, normalize, deduplicate, split, mix, tokenize and pack JSONL.

Pure Python + numpy/sentencepiece/datasketch: nothing here imports NeMo, torch or megatron, so
prep runs (and is tested) in seconds on any machine. `pipeline.run_prep` is the whole stage.
"""
