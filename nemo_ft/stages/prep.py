"""`nemo-ft prep`: the Hydra entry point of the data prep stage (the work is in nemo_ft.data).

Bad input or config ends with one readable line and exit code 2 — no traceback, because the
person reading it needs the file, line and key, not our stack.
"""
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_ft.config.entry import stage_main
from nemo_ft.errors import ConfigError


def _summary(m: dict) -> str:
    s = m["summary"]
    c = s["counts"]
    lines = [f"prep: {c['in']} rows in -> {c['accepted']} kept + {c['rejected_total']} rejected "
             f"({s['examples_per_second']} rows/s, {s['workers']} worker(s))"]
    if c["rejected"]:
        lines.append("  rejected: " + ", ".join(f"{k}={v}" for k, v in c["rejected"].items()))
    lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in c["splits"].items())
                 + f"; train rows written {c['train_rows_written']}; truncated {c['truncated']}"
                 + (f"; general rows held out for eval {c['general_heldout']}" if c.get("general_heldout") else "")
                 + (f"; DPO responses given a leading space {c['dpo_prefix_fixed']}" if c.get("dpo_prefix_fixed") else ""))
    for path, r in (s.get("mix") or {}).items():
        if r["repeat_factor"] is None:  # an input forced into validation/test takes no share of train
            continue
        lines.append(f"  mix {path}: target {r['target_share']:.3f} achieved {r['achieved_share']:.3f} "
                     f"(x{r['repeat_factor']})")
    for split, p in (s.get("pack") or {}).items():
        lines.append(f"  packed {split}: {p['num_sequences']} seqs -> {p['num_packs']} packs of {p['pack_size']}, "
                     f"fill {p['packing_efficiency']}% -> {p['file']}")
    return "\n".join(lines)


@stage_main("prep", "prep")
def main(cfg: DictConfig) -> None:
    from nemo_ft.data.config import PrepConfig
    from nemo_ft.data.pipeline import run_prep

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(getattr(err, "full_key", None) or "config", str(err).splitlines()[0]) from None
    pc = PrepConfig.from_dict(resolved)
    manifest = run_prep(pc, resolved_config=resolved)
    print(_summary(manifest))
    print(f"  out_dir: {pc.out_dir}")


if __name__ == "__main__":
    main()
