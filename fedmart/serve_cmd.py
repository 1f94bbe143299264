"""``fedmart serve``: the recommendation and search API over the newest signed promotion that passes its checks."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedmart.cli import command
from fedmart.console import setup_logging
from fedmart.errors import UserError, exit_on_user_error
from fedmart.registry_cmds import default_registry_root, need_public_key, public_key_arg

__all__ = ["API_KEY_ENV", "serve_cmd"]

API_KEY_ENV = "FEDMART_API_KEY"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, help="registry directory (default: the newest outputs/*/registry)")
    public_key_arg(p)
    p.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="the catalog.parquet to serve while the registry has no signed catalog version "
        "(`fedmart registry publish-catalog`; the newest signed one is served and hot-swapped)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"require x-api-key (default ${API_KEY_ENV}; prefer env)"
    )
    p.add_argument("--reload-interval", type=float, default=10.0, help="seconds between checks for a new promotion")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-batch", type=int, default=64, help="largest micro-batch of concurrent /recommend requests")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-search", action="store_true", help="do not build the title index (/search answers 501)")
    p.add_argument("--text-cache", type=Path, help="title embeddings cache (.npy; one file per catalog version)")
    p.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="TERM",
        help="serve only a version whose signed metadata meets TERM: dp, secagg, epsilon<=X (repeatable)",
    )
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="where the highest promotion counter served is kept across restarts "
        "(default: $XDG_STATE_HOME/fedmart/serve-<registry>.json; keep it out of the registry writers' reach)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


@exit_on_user_error
def serve_cmd(args: argparse.Namespace) -> int:
    from serving.config import ServeConfig, ServeError
    from serving.http import run_http
    from serving.policy import default_state_path

    setup_logging(args.log_level)
    try:
        registry = Path(args.registry) if args.registry else default_registry_root()
        config = ServeConfig(
            registry=registry,
            public_key=need_public_key(args),
            catalog=Path(args.catalog) if args.catalog else None,
            host=args.host,
            port=args.port,
            api_key=args.api_key or None,
            reload_interval=args.reload_interval,
            device=args.device,
            max_batch=args.max_batch,
            threads=args.threads,
            search=not args.no_search,
            text_cache=args.text_cache,
            require=tuple(args.require),
            state=args.state or default_state_path(registry),
        )
        run_http(config, log_level=args.log_level)
    except (ServeError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc).splitlines()[0]) from exc
    return 0


serve_cmd.add_arguments = _serve_args  # type: ignore[attr-defined]
command("serve", "serve recommendations and search from the newest promoted, verified model")(serve_cmd)
