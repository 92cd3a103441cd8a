"""Run a restored NeMo model on given inputs and print JSON: a helper the e2e tests start as a process
(torchrun for TP/PP layouts), restoring exactly as the stages do (lifecycle.start + run.restore).

    python tests/e2e/model_probe.py BASE [--adapter A.nemo] --inputs ids.json --mode logits|greedy|nocache \
        [--max-new 16] [overrides...]

inputs: a JSON list of token-id lists (or of strings for greedy and reward). Output (rank 0, last line):
JSON with "logits" ([prompt][position][vocab], gathered over TP), "generations" ([{ids, ended_with_eos}])
or "rewards" (mode=reward: BASE is an Aligner reward model .nemo, one reward per text).
"""
import argparse
import json
import sys

from hydra import compose, initialize_config_dir

import nemo_ft.config  # noqa: F401
from nemo_ft.config.validate import validate_sft
from nemo_ft.paths import CONF_DIR


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--adapter")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--mode", choices=("logits", "greedy", "nocache", "reward"), required=True)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--run-dir", default="/tmp/nemo_ft_model_probe")
    args, overrides = ap.parse_known_args(argv)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("sft_lora", overrides=["peft=none", f"model.restore_from_path={args.base}", "run.check_arch=false",
                                             f"run.dir={args.run_dir}", "trainer.enable_progress_bar=false",
                                             "exp_manager.create_checkpoint_callback=false",
                                             "exp_manager.resume_if_exists=false", *overrides])
    import torch

    from nemo_ft.runtime import generation
    from nemo_ft.stages import lifecycle

    run = lifecycle.start("probe", cfg, checks=validate_sft, nemo_inputs=("model.restore_from_path",),
                          aligner=args.mode == "reward")
    if args.mode == "reward":  # a NeMo-Aligner reward model .nemo: its head scores whole texts
        from nemo_aligner.models.nlp.gpt.megatron_gpt_reward_model import MegatronGPTRewardModel
        model = run.restore(args.base, model_cls=MegatronGPTRewardModel)
        model.eval()
        with torch.no_grad():
            rewards = model.infer(json.loads(open(args.inputs).read()))
        if run.rank0:
            print(json.dumps({"rewards": rewards.float().flatten().tolist()}))
        return
    model = run.restore(args.base)
    if args.adapter:
        model.load_adapters(args.adapter)
    model.eval()
    inputs = json.loads(open(args.inputs).read())
    out = {}
    if args.mode == "logits":
        from megatron.core import tensor_parallel

        out["logits"] = []
        with torch.no_grad():
            for ids in inputs:  # one sequence at a time: prompts have their own lengths
                tokens = torch.tensor([ids])
                logits = model.model(tokens, torch.arange(len(ids))[None], None)
                out["logits"].append(tensor_parallel.gather_from_tensor_model_parallel_region(logits)[0].float().tolist())
    elif args.mode == "greedy":
        out["generations"] = [g.__dict__ for g in generation.greedy(model, inputs, args.max_new)]
    else:
        out["generations"] = [generation.greedy_no_cache(model, p, args.max_new).__dict__ for p in inputs]
    if run.rank0:
        print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
