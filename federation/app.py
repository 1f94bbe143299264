"""The coordinator's ServerApp (Flower Message API). Wiring only: the work is in
:mod:`federation.server`."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from conf.settings import RunSettings
from federation.runconfig import unflatten
from federation.server import run_server

__all__ = ["app", "build_server_app"]


def build_server_app(fixed_run_config: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``fixed_run_config`` replaces ``context.run_config`` (in-process simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = fixed_run_config if fixed_run_config is not None else dict(context.run_config)
        run_server(grid, RunSettings.from_dict(unflatten(flat)))  # validated once, where it enters

    return server_app


app = build_server_app()
