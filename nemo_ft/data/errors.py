"""The one error type bad *data* raises: it names the file, the line and the key."""
from typing import Optional


class PrepError(Exception):
    """Input that prep cannot continue with; the stage prints it as one line and exits 2."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None):
        self.path, self.line, self.key = path, line, key
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")
