"""Config helpers shared by every stage: OmegaConf resolvers and readable config errors."""
from omegaconf import OmegaConf

from nemo_ft.paths import REPO_ROOT


class ConfigError(ValueError):
    """A bad config value: `key` names it, the message says what was expected and how to fix it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def _repo_path(rel: str) -> str:
    return str(REPO_ROOT / rel)


# ${repo:data/x} -> absolute path inside the checkout, so configs work from any cwd.
if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", _repo_path)


# NeMo's hydra_runner registers this one; our stages use hydra.main directly.
if not OmegaConf.has_resolver("multiply"):
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
