"""The CLI's console (rich). Library code logs; only command entry points print here."""

from __future__ import annotations

from rich.console import Console

__all__ = ["console", "err_console", "quiet_third_party_logs", "setup_logging"]

console = Console()
err_console = Console(stderr=True)


def quiet_third_party_logs() -> None:
    """Hydra sets the root logger to INFO; keep other libraries' chatter out of the run log."""
    import logging

    for name in ("alembic", "matplotlib", "datasets", "urllib3", "filelock", "httpx", "PIL", "flwr"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(level: str | int) -> None:
    """Log to whatever ``sys.stderr`` is when a record is written, not when logging was set up.

    ``logging.basicConfig`` binds the stream it finds: a command run in-process (tests, a
    notebook) that swaps stderr later would log into a closed file ("--- Logging error ---").
    """
    import logging
    import sys

    class _CurrentStderr(logging.StreamHandler):
        @property  # type: ignore[override]
        def stream(self):  # noqa: D401 - the live stderr
            return sys.stderr

        @stream.setter
        def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it
            pass

    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if type(h).__name__ != "_CurrentStderr"]  # set up once
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
