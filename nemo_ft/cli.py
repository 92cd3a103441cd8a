"""`nemo-ft <stage> [hydra overrides]`: the same as `python -m nemo_ft.stages.<stage> [overrides]`."""
import importlib
import sys

STAGES = {
    "base": "build the tiny Llama-shaped base .nemo and its SentencePiece tokenizer",
    "prep": "validate, normalize, deduplicate, mix, split and pack JSONL data",
    "sft": "LoRA (or another NeMo PEFT scheme) supervised fine-tuning",
    "plan": "per-GPU memory estimate and parallel layout search, before any job starts",
    "export": "adapter (any TP/PP) -> TP=1 .nemo, HF-PEFT, HF base, merged, NIM/Triton/vLLM layouts",
    "import": "a Hugging Face Llama-family checkpoint -> a base .nemo",
    "dpo": "DPO / IPO / RPO with a LoRA policy through NeMo-Aligner (the SFT adapter merged into the reference)",
    "rm": "a binary-ranking reward model through NeMo-Aligner (full-parameter)",
    "reinforce": "REINFORCE (RLOO) with a LoRA policy through NeMo-Aligner, its reward server started on 127.0.0.1",
    "reward_server": "a reward (a nemo-ft rm model, or a rule against references) over PyTriton for RLHF actors",
    "ppo": "PPO with a LoRA policy through NeMo-Aligner, its critic + reward model server started on 127.0.0.1",
    "critic_server": "NeMo-Aligner's PPO critic (and reward model) over PyTriton, trained by the PPO actor's calls",
    "eval": "base vs adapter(s) on held-out rows: loss, generation metrics, forgetting, gates (exit 3 on a fail)",
    "serve": "an export behind vLLM (OpenAI API) or Triton (NeMo in-framework) on 127.0.0.1: base + adapters",
}
# A stage whose module name differs from its command (`import` is a Python keyword).
MODULES = {"import": "import_hf"}


def usage() -> str:
    lines = ["usage: nemo-ft <stage> [hydra overrides...]", "", "stages:"]
    lines += [f"  {name:<13} {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"nemo-ft: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"nemo_ft.stages.{MODULES.get(stage, stage)}")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("nemo_ft.stages"):
            print(f"nemo-ft: stage {stage!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    # Hydra reads sys.argv; present the stage as if it were run as its own module.
    sys.argv = [f"nemo-ft {stage}"] + rest
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
