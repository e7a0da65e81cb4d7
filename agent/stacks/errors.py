"""The error a stack or channel file is rejected with.

Every rejection carries a short machine-readable `code` (for MQTT error messages, the
`failed/` sidecar and tests) and a sentence for people that names the file.
"""

from __future__ import annotations

from pathlib import Path


class StackError(Exception):
    """A stack or one of its files cannot be processed; the agent reports it and moves on."""

    def __init__(self, code: str, message: str, path: Path | str | None = None) -> None:
        self.code = code
        self.path = Path(path) if path is not None else None
        self.message = message
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{message} [{code}]")

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "message": self.message,
            "path": str(self.path) if self.path is not None else "",
        }
