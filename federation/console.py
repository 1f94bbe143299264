"""The CLI's console (rich). Library code logs; only command entry points print here."""

from __future__ import annotations

from rich.console import Console

__all__ = ["console", "err_console"]

console = Console()
err_console = Console(stderr=True)
