"""How every stage starts and how it fails: `@stage_main(stage, config_name)`.

In the spirit of NeMo's `@hydra_runner`: Hydra composes conf/<config_name>.yaml with the command's
overrides and calls the stage. What it adds:
- an override that names no key of the composed config (`model.peft.lora_tuning.adaptr_dim=8`) or
  no option of a group (`parallel=cpu_tp3`) is a config error with the closest existing name,
  instead of Hydra's struct error and traceback hint;
- every NemoFtError a stage raises (ConfigError, InputError, a StageErrors group of them,
  GateFailure) ends the process with one line per problem and its exit code (2, or 3 for gates),
  never a traceback.
"""
from __future__ import annotations

import difflib
import functools
import os
import sys
from typing import Callable, Iterable

from nemo_ft.errors import ConfigError, GateFailure, InputError, NemoFtError, Preempted
from nemo_ft.paths import CONF_DIR


class StageErrors(NemoFtError):
    """Several problems found at once (validation reports all of them, not the first)."""

    def __init__(self, errors: Iterable[NemoFtError], started: bool = False):
        self.errors = list(errors)
        self.started = started
        super().__init__("; ".join(str(e) for e in self.errors))


def format_errors(stage: str, errors: list, started: bool = False) -> str:
    """One line for one problem, else a head line and one line per problem:
    `nemo-ft sft: config error, nothing was started: model.x: ...`."""
    kinds = {"config" if isinstance(e, ConfigError) else "input" for e in errors}
    kind = "config" if kinds == {"config"} else "input" if kinds == {"input"} else "config/input"
    n = len(errors)
    head = f"nemo-ft {stage}: {'' if n == 1 else f'{n} '}{kind} error{'s' if n > 1 else ''}"
    head += ":" if started else ", nothing was started:"
    if n == 1:
        return f"{head} {errors[0]}"
    return "\n".join([head] + [f"  - {e}" for e in errors])


def fail(stage: str, errors: list, started: bool = False, code: int = 2):
    print(format_errors(stage, errors, started), file=sys.stderr)
    sys.exit(code)


def _children(node):
    """{key: child node} of a DictConfig without resolving or validating any value."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return {}
    return {k: node._get_node(k) for k in node.keys()}


def _all_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k, child in _children(node).items():
        out.append(f"{prefix}{k}")
        out += _all_keys(child, f"{prefix}{k}.")
    return out


def _has_key(cfg, dotted: str) -> bool:
    """Does the composed config have this key (its value may be ??? or an interpolation)?"""
    node = cfg
    for part in dotted.split("."):
        children = _children(node)
        if part not in children:
            return False
        node = children[part]
    return True


def _suggest(key: str, keys: list[str]) -> str:
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not near:
        return ""
    parent = key.rpartition(".")[0]
    # Same parent: the leaf is enough ("did you mean adapter_dim?"); else the whole key.
    return f"; did you mean {near[0].rpartition('.')[2] if near[0].rpartition('.')[0] == parent else near[0]}?"


def check_overrides(config_name: str, argv: list[str]) -> list[ConfigError]:
    """Compose the config the way Hydra will and explain each override it would refuse."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.shell_completion:
        return []
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as err:
        return [ConfigError("overrides", str(err).strip().splitlines()[0])]
    errors = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            known_groups = set(loader.list_groups(""))
            groups, values = [], []
            for o in overrides:
                name = o.key_or_group
                (groups if name in known_groups or "/" in name else values).append(o)
            for o in groups:
                options = loader.get_group_options(o.key_or_group)
                value = o.value()
                if o.is_delete() or not isinstance(value, str) or value in options:
                    continue
                near = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
                errors.append(ConfigError(o.key_or_group, f"no option {value!r}"
                                          + (f"; did you mean {near[0]}?" if near else "")
                                          + f" (options: {', '.join(sorted(options))})"))
            if errors:
                return errors
            try:
                cfg = compose(config_name, overrides=[o.input_line for o in groups])
            except HydraException as err:
                return [ConfigError("overrides", str(err).strip().splitlines()[0])]
            keys = _all_keys(cfg)
            for o in values:
                if o.is_add() or o.is_force_add() or o.is_delete() or o.key_or_group.startswith("hydra.") \
                        or _has_key(cfg, o.key_or_group):
                    continue
                errors.append(ConfigError(o.key_or_group, f"no such key in the {config_name} config"
                                          f"{_suggest(o.key_or_group, keys)} (to add a key on purpose: "
                                          f"+{o.key_or_group}=...)"))
    finally:
        GlobalHydra.instance().clear()
    return errors


# What torch.distributed raises on a rank whose peer died (kill -9, OOM kill, a lost node): gloo sees
# the socket close at once; NCCL's watchdog aborts the communicator at the process group's timeout.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout",
              "ProcessGroupNCCL's watchdog", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    return any(s in str(err) for s in _PEER_LOST)


def stage_main(stage: str, config_name: str) -> Callable:
    """Decorate `fn(cfg)` as the stage's entry point (`python -m nemo_ft.stages.<stage>`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def main():
            import hydra

            import nemo_ft.config  # noqa: F401  (registers ${repo:} and ${multiply:} before Hydra composes)

            problems = check_overrides(config_name, sys.argv[1:])
            if problems:
                fail(stage, problems)

            @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
            def _run(cfg):
                try:
                    return fn(cfg)
                except StageErrors as err:
                    fail(stage, err.errors, err.started)
                except (GateFailure, Preempted) as err:
                    print(f"nemo-ft {stage}: {err}", file=sys.stderr, flush=True)
                    sys.exit(err.exit_code)
                except ConfigError as err:  # config is checked before work: nothing was started
                    fail(stage, [err])
                except InputError as err:
                    fail(stage, [err], started=True)
                except RuntimeError as err:
                    if not lost_peer(err):
                        raise
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    print(f"nemo-ft {stage}: rank {os.environ.get('RANK', '0')} lost another process of this job "
                          f"({first[:300]}); stopping. Checkpoints already written are kept: rerun the same "
                          f"command to resume from the newest complete one.", file=sys.stderr, flush=True)
                    sys.exit(1)
            return _run()
        return main
    return wrap

