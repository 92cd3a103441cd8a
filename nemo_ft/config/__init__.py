"""Config helpers shared by every stage: OmegaConf resolvers (registered on import) and ConfigError.

Only the stages and the config checks import this package; the pure core raises
nemo_ft.errors.ConfigError directly (the same class) and never registers resolvers."""
from omegaconf import OmegaConf

from nemo_ft.errors import ConfigError  # noqa: F401  (the one ConfigError; re-exported for stages)
from nemo_ft.paths import REPO_ROOT


def _repo_path(rel: str) -> str:
    return str(REPO_ROOT / rel)


# ${repo:data/x} -> absolute path inside the checkout, so configs work from any cwd.
if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", _repo_path)


# NeMo's hydra_runner registers this one; our stages use hydra.main directly.
if not OmegaConf.has_resolver("multiply"):
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)

# NeMo-Aligner's RLHF scripts register these two (gpt_reinforce_actor.yaml, gpt_ppo_actor.yaml use them).
for _name, _fn in (("int_div", lambda x, y: x // y), ("subtract", lambda x, y: x - y)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
