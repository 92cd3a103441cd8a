"""`nemo-ft reward_server`: a reward over PyTriton, in the interface NeMo-Aligner's RLHF actor calls
(RemoteGPTRMClient: model `reward_model`, inputs `tokens` + `sequence_lengths`, output `rewards`).

    nemo-ft reward_server kind=rm from_run=runs/demo/rm port=5555
    nemo-ft reward_server kind=rule rule.data_dir=runs/demo/prep_rlhf port=5555

kind=rm: Aligner's own RewardModelServer (its batching, padding and distributed inference; ranks > 0
run its subscriber loop) around the restored reward model. kind=rule: nemo_ft.eval.reward's rule
(token F1 or exact match of the answer against the prompt's reference), no model and no NeMo.

Either way Triton runs on `host` (127.0.0.1 by default, not Aligner's hard-coded 0.0.0.0) with a short
exit timeout, and SIGTERM/SIGINT stop it cleanly: the RLHF stages start this as a child process, wait
for its readiness URLs and stop it on every exit path (nemo_ft.runtime.servers).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_ft import artifacts
from nemo_ft.config.entry import stage_main
from nemo_ft.errors import ConfigError, InputError

KINDS = ("rule", "rm")
RM_KEY = "rm_model_file"


def derive(cfg: DictConfig) -> list[str]:
    if cfg.kind == "rm" and cfg.from_run and not cfg.rm_model_file:
        cfg.rm_model_file = str(artifacts.read_manifest(cfg.from_run, stage="rm", key="from_run").output("reward_model"))
    if cfg.kind == "rule" and cfg.rule.data_dir and not cfg.rule.files:
        m = artifacts.read_manifest(cfg.rule.data_dir, stage="prep", key="rule.data_dir")
        cfg.rule.files = [str(m.output(role)) for role in ("train", "validation", "test") if m.output(role)]
    return []


def checks(cfg: DictConfig, skip=frozenset()) -> list:
    errors = []
    if cfg.kind not in KINDS:
        return [ConfigError("kind", f"{cfg.kind!r}: expected one of {KINDS}")]
    if not isinstance(cfg.port, int) or not 0 < cfg.port < 65536:
        errors.append(ConfigError("port", f"{cfg.port!r}: expected a TCP port"))
    if cfg.kind == "rm":
        if not cfg.rm_model_file:
            errors.append(ConfigError(RM_KEY, "kind=rm needs the reward model: rm_model_file=<rm.nemo> or "
                                              "from_run=<a nemo-ft rm run dir>"))
        elif not Path(cfg.rm_model_file).exists():
            errors.append(ConfigError(RM_KEY, f"file not found: {cfg.rm_model_file}"))
        return errors
    from nemo_ft.stages._aligner import rows

    if cfg.rule.metric not in ("f1", "exact"):
        errors.append(ConfigError("rule.metric", f"{cfg.rule.metric!r}: expected f1 or exact"))
    if not cfg.rule.files:
        errors.append(ConfigError("rule.files", "kind=rule needs the prompts and their references: "
                                                "rule.data_dir=<a nemo-ft prep task=rlhf out_dir> or rule.files=[...]"))
    for i, path in enumerate(cfg.rule.files or []):
        if not Path(path).exists():
            errors.append(ConfigError(f"rule.files[{i}]", f"file not found: {path}"))
            continue
        data = rows(path)
        bad = next((n for n, r in enumerate(data, 1) if not {"text", "reference"} <= set(r)), None)
        if bad:
            errors.append(InputError('rows need "text" and "reference": not `nemo-ft prep task=rlhf` output',
                                     path=path, line=bad, key=f"rule.files[{i}]"))
    if not cfg.rule.tokenizer_from or not Path(cfg.rule.tokenizer_from).exists():
        errors.append(ConfigError("rule.tokenizer_from", f"the policy's .nemo (its tokenizer decodes the rollouts) "
                                                         f"not found: {cfg.rule.tokenizer_from}"))
    return errors


def rule_reward(cfg: DictConfig):
    from nemo_ft.eval.reward import RuleReward
    from nemo_ft.stages._aligner import nemo_tokenizer, rows

    data = [r for path in cfg.rule.files for r in rows(path)]
    with nemo_tokenizer(cfg.rule.tokenizer_from, "rule.tokenizer_from") as tok:
        if tok is None:
            raise InputError("packs no SentencePiece tokenizer to decode rollouts with", path=cfg.rule.tokenizer_from,
                             key="rule.tokenizer_from")
        return RuleReward.from_rows(data, tok.encode, tok.decode, tok.eos_id, cfg.rule.metric)


def rule_model(rule):
    """(infer_func, inputs, outputs) of the rule, in the tensors Aligner's RewardModelServer declares."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    @batch
    def infer(**inputs):
        tokens, lengths = inputs["tokens"], inputs["sequence_lengths"].reshape(-1)
        rewards = [[rule.score(t, int(n))] for t, n in zip(tokens, lengths)]
        return {"rewards": np.asarray(rewards, dtype=np.float32)}

    inputs = (Tensor(name="tokens", shape=(-1,), dtype=np.int64),
              Tensor(name="sequence_lengths", shape=(-1,), dtype=np.int64))
    return infer, inputs, (Tensor(name="rewards", shape=(1,), dtype=np.float32),)


def rm_server(cfg: DictConfig):
    """Aligner's RewardModelServer around the restored reward model; (run, server)."""
    from nemo_aligner.algorithms.reward_server import RewardModelServer
    from nemo_aligner.models.nlp.gpt.reward_model_classes import REWARD_MODEL_CLASS_DICT, RewardModelType
    from nemo_aligner.utils.text_generation_utils import tokenize_batch
    from nemo_aligner.utils.train_script_utils import init_distributed

    from nemo_ft.nemo_archive import read_config
    from nemo_ft.stages import lifecycle

    run = lifecycle.start("reward_server", cfg, checks=checks, derive=None, nemo_inputs=(RM_KEY,), aligner=True,
                          rlhf=True)
    kind = RewardModelType(read_config(cfg.rm_model_file).get("reward_model_type", "binary_ranking"))
    model = run.restore(cfg.rm_model_file, model_cls=REWARD_MODEL_CLASS_DICT[kind])
    model.freeze()
    init_distributed(run.trainer, model, cfg.model.get("transformer_engine", False))
    model.prepare_for_inference()

    def tokenize(sentences):
        return tokenize_batch(sentences=sentences, tokenizer=model.tokenizer, max_len=model.cfg.encoder_seq_length,
                              add_BOS=False, add_EOS=False)

    server = RewardModelServer(
        infer_fn=model.infer, tokenize_func=tokenize, model_name=cfg.model_name, port=cfg.port,
        inference_micro_batch_size=int(cfg.inference.micro_batch_size),
        model_forward_micro_batch_size=int(cfg.model.forward_micro_batch_size),
        strip_sequence_length_to_multiple=cfg.inference.strip_sequence_length_to_multiple,
        max_queue_delay_microseconds=cfg.inference.max_queue_delay_microseconds)
    return run, server


def serve(cfg: DictConfig, models: dict, log_dir: Path) -> None:
    """Triton with `models` until SIGTERM/SIGINT (exit 0) or until Triton dies (exit 1); stopped either way,
    nothing left behind (its own exit timeout: 5 s)."""
    import os

    from nemo_ft.runtime import servers

    grpc = cfg.grpc_port or servers.free_port()
    tlog = log_dir / "triton.log"
    seen, died = {}, False
    with servers.stop_signals():
        triton = servers.start_triton(models, port=int(cfg.port), grpc_port=int(grpc), log=tlog,
                                      max_batch_size=1 << 20,
                                      queue_delay_us=int(cfg.inference.max_queue_delay_microseconds), host=cfg.host)
        try:
            print(f"[nemo-ft reward_server] {cfg.kind}: serving {list(models)} on http://{cfg.host}:{cfg.port}",
                  flush=True)
            while triton.is_alive():
                servers.remember(os.getpid(), seen)
                time.sleep(0.5)
            died = True
        except KeyboardInterrupt as why:
            print(f"[nemo-ft reward_server] {why or 'SIGINT'}: stopping", flush=True)
        finally:
            with servers.signals_ignored():
                triton.stop()
                servers.kill_leftovers(os.getpid(), seen)
    if died:
        print(f"nemo-ft reward_server: Triton stopped; the last lines of {tlog}:\n{servers.log_tail(tlog)}",
              file=sys.stderr, flush=True)
        sys.exit(1)


def run(cfg: DictConfig) -> None:
    if cfg.kind == "rule":
        from nemo_ft.config.entry import StageErrors

        errors = checks(cfg)
        if errors:
            raise StageErrors(errors)
        OmegaConf.set_readonly(cfg, True)
        rule = rule_reward(cfg)
        print(f"[nemo-ft reward_server] rule: {cfg.rule.metric} against the references of {len(rule.prompts)} "
              f"prompts ({len(cfg.rule.files)} file(s))", flush=True)
        serve(cfg, {cfg.model_name: rule_model(rule)}, Path(cfg.run.dir))
        print(f"[nemo-ft reward_server] scored {rule.scored} rollouts", flush=True)
        return
    started, server = rm_server(cfg)
    if started.rank0:
        serve(cfg, {cfg.model_name: (server.infer, server.inputs, server.outputs)}, started.dir)
    else:
        server.run_subscriber_loop()  # Aligner's: forward when rank 0 broadcasts a request
    sys.stdout.flush()


@stage_main("reward_server", "reward_server")
def main(cfg: DictConfig) -> None:
    derive(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
