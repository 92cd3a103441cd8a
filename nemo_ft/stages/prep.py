"""`nemo-ft prep`: the Hydra entry point of the data prep stage (the work is in nemo_ft.data).

Bad input or config ends with one readable line and exit code 2 — no traceback, because the
person reading it needs the file, line and key, not our stack.
"""
import sys

import nemo_ft.config  # noqa: F401  (registers the ${repo:...} resolver before Hydra composes)
import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_ft.config import ConfigError
from nemo_ft.data.errors import PrepError
from nemo_ft.paths import CONF_DIR


def _summary(m: dict) -> str:
    c = m["counts"]
    lines = [f"prep: {c['in']} rows in -> {c['accepted']} kept + {c['rejected_total']} rejected "
             f"({m['examples_per_second']} rows/s, {m['workers']} worker(s))"]
    if c["rejected"]:
        lines.append("  rejected: " + ", ".join(f"{k}={v}" for k, v in c["rejected"].items()))
    lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in c["splits"].items())
                 + f"; train rows written {c['train_rows_written']}; truncated {c['truncated']}"
                 + (f"; DPO responses given a leading space {c['dpo_prefix_fixed']}" if c.get("dpo_prefix_fixed") else ""))
    if m.get("mix"):
        for path, r in m["mix"].items():
            lines.append(f"  mix {path}: target {r['target_share']:.3f} achieved {r['achieved_share']:.3f} "
                         f"(x{r['repeat_factor']})")
    for split, p in (m.get("pack") or {}).items():
        lines.append(f"  packed {split}: {p['num_sequences']} seqs -> {p['num_packs']} packs of {p['pack_size']}, "
                     f"fill {p['packing_efficiency']}% -> {p['file']}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prep")
def main(cfg: DictConfig) -> None:
    from nemo_ft.data.pipeline import PrepConfig, run_prep

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        pc = PrepConfig.from_dict(resolved)
        manifest = run_prep(pc, resolved_config=resolved)
    except (ConfigError, PrepError, OmegaConfBaseException) as err:
        print(f"nemo-ft prep: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(_summary(manifest))
    print(f"  out_dir: {pc.out_dir}")


if __name__ == "__main__":
    main()
