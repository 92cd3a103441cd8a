"""`nemo-ft plan`: print the per-GPU memory of a layout, or the layouts that fit, without importing NeMo.

Text by default, one JSON object with `format=json` (a list with `search=true`). A layout that does not
fit says so and names the nearest one that does. Exit code 2 on a bad config value.
"""
import json

from omegaconf import DictConfig

from nemo_ft import plan as planner
from nemo_ft.config.entry import stage_main
from nemo_ft.errors import ConfigError


def _choice(group: str, default: str = "") -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get(group, default))
    except ValueError:  # not running under Hydra
        return default


def run(cfg: DictConfig) -> int:
    fmt = str(cfg.get("format", "text"))
    if fmt not in ("text", "json"):
        raise ConfigError("format", f"{fmt!r} is not text or json")
    name = _choice("model", "model")
    if cfg.get("search", False):
        plans = planner.search(cfg)
        top = int(cfg.get("top", 10))
        if fmt == "json":
            print(json.dumps([dict(p.as_json(), layout=p.layout.__dict__, overrides=planner.layout_overrides(p.layout))
                              for p in plans[:top]], indent=None))
            return 0
        if not plans:
            print(f"no layout of {planner.estimate(cfg).layout.num_gpus} GPUs fits; try more GPUs (num_gpus=) "
                  "or a PEFT scheme (peft=lora|qlora)")
            return 0
        print(f"layouts that fit, best first ({len(plans)} fit; ranking is a heuristic, see throughput_score):")
        for i, p in enumerate(plans[:top], 1):
            print(f"{i:>3}. {p.total / 1e9:7.1f} / {p.capacity / 1e9:.0f} GB  {p.layout.describe()}")
            print(f"       {planner.layout_overrides(p.layout)}")
        return 0
    plan = planner.estimate(cfg)
    plan.model_name = name
    if fmt == "json":
        print(json.dumps(plan.as_json()))
        return 0
    print(plan.as_text())
    if not plan.fits:
        print("\n" + planner.misfit_message(cfg, plan))
    return 0


@stage_main("plan", "plan")
def main(cfg: DictConfig) -> int:
    return run(cfg)


if __name__ == "__main__":
    main()
