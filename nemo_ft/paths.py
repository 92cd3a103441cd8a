"""Where the repository's shipped configs and data live (the package is installed editable)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
DATA_DIR = REPO_ROOT / "data"
