"""The CLI's console (rich). Library code logs; only command entry points print here."""

from __future__ import annotations

from rich.console import Console

__all__ = ["console", "err_console", "quiet_third_party_logs"]

console = Console()
err_console = Console(stderr=True)


def quiet_third_party_logs() -> None:
    """Hydra sets the root logger to INFO; keep other libraries' chatter out of the run log."""
    import logging

    for name in ("alembic", "matplotlib", "datasets", "urllib3", "filelock", "httpx", "PIL", "flwr"):
        logging.getLogger(name).setLevel(logging.WARNING)
