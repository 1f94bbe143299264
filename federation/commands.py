"""Subcommands ``fedmart registry``, ``fedmart audit`` and ``fedmart serve`` (imported by the CLI)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
from pathlib import Path

from federation.cli import command
from federation.errors import UserError, exit_on_user_error

__all__ = ["default_registry_root", "registry_cmd", "audit_cmd", "serve_cmd"]

PUBLIC_KEY_ENV = "FEDMART_PUBLIC_KEY"
API_KEY_ENV = "FEDMART_API_KEY"


def default_registry_root(outputs: Path = Path("outputs")) -> Path:
    """The newest ``outputs/*/registry`` (by modification time)."""
    candidates = [p for p in outputs.glob("*/registry") if p.is_dir()]
    if not candidates:
        raise UserError(f"no {outputs}/*/registry found; pass --root DIR (a run's registry directory)")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _public_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--public-key",
        type=Path,
        default=os.environ.get(PUBLIC_KEY_ENV),
        help=f"the signer's Ed25519 public key (PEM .pub; default ${PUBLIC_KEY_ENV})",
    )


def _need_public_key(args: argparse.Namespace) -> Path:
    if not args.public_key:
        raise UserError(f"pass --public-key PEM (the signer's .pub file) or set ${PUBLIC_KEY_ENV}")
    return Path(args.public_key)


def _open_registry(args: argparse.Namespace, *, need_key: bool):
    from federation.registry import ModelRegistry
    from privacy.signing import KeyFileError

    root = Path(args.root) if args.root else default_registry_root()
    if not root.is_dir():
        raise UserError(f"{root}: no registry there; pass --root DIR")
    key = _need_public_key(args) if need_key else (Path(args.public_key) if args.public_key else None)
    try:
        return ModelRegistry(root, public_key_path=key)
    except KeyFileError as exc:
        raise UserError(str(exc)) from exc


# --- fedmart registry ------------------------------------------------------------------------


def _registry_common(p: argparse.ArgumentParser, *, sub: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS keeps a subparser from resetting the parent's value.
    kw = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument("--root", type=Path, help="registry directory (default: the newest outputs/*/registry)", **kw)
    p.add_argument(
        "--public-key",
        type=Path,
        help=f"the signer's Ed25519 public key (PEM .pub; default ${PUBLIC_KEY_ENV})",
        **(kw or {"default": os.environ.get(PUBLIC_KEY_ENV)}),
    )


def _registry_args(p: argparse.ArgumentParser) -> None:
    _registry_common(p, sub=False)
    sub = p.add_subparsers(dest="registry_cmd", required=True)
    ls = sub.add_parser("list", help="versions, oldest first, with round, metrics and promotion")
    s = sub.add_parser("show", help="a version's metadata (JSON)")
    s.add_argument("version")
    v = sub.add_parser("verify", help="check signatures and file hashes (all versions, or one)")
    v.add_argument("version", nargs="?")
    pr = sub.add_parser("promote", help="mark a verified version for serving (recorded in promotions.jsonl)")
    pr.add_argument("version")
    for sp in (ls, s, v, pr):
        _registry_common(sp, sub=True)
    pr.add_argument("--by", default=None, help="who promotes (default: the current user)")
    pr.add_argument(
        "--audit", type=Path, default=None, help="audit log to record the promotion in (default: ROOT/../audit.jsonl)"
    )


@exit_on_user_error
def registry_cmd(args: argparse.Namespace) -> int:
    from rich.table import Table

    from federation.console import console
    from federation.registry import RegistryError

    cmd = args.registry_cmd
    reg = _open_registry(args, need_key=cmd in ("verify", "promote"))
    try:
        if cmd == "list":
            rows = reg.list()
            if not rows:
                console.print(f"{reg.root}: no versions yet")
                return 0
            t = Table(title=str(reg.root))
            t.add_column("version", no_wrap=True)
            for name in ("run", "round", "created", "parent", "metrics", "promoted"):
                t.add_column(name)
            for r in rows:
                metrics = ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.metrics.items()
                )
                t.add_row(
                    r.version,
                    r.run,
                    str(r.round),
                    r.created_at[:19],
                    r.parent or "",
                    metrics[:60],
                    "yes" if r.promoted else "",
                )
            console.print(t)
            return 0
        if cmd == "show":
            console.print_json(json.dumps(reg.show(args.version), default=str))
            return 0
        if cmd == "verify":
            versions = [args.version] if args.version else reg.versions()
            if not versions:
                raise UserError(f"{reg.root}: no versions to verify")
            bad = 0
            for v in versions:
                ok, reason = reg.verify(v)
                bad += not ok
                reason = reason.removeprefix(f"{v}: ")
                console.print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {v}: {reason}", soft_wrap=True)
            if bad:
                console.print(f"[red]{bad} of {len(versions)} version(s) failed verification[/]", soft_wrap=True)
            return 1 if bad else 0
        # promote
        record = reg.promote(args.version, by=args.by or getpass.getuser())
        audit = args.audit or reg.root.parent / "audit.jsonl"
        if args.audit or audit.exists():
            from privacy.audit import AuditError, AuditLog

            try:
                AuditLog(audit).append("promotion", **{k: v for k, v in record.items() if k != "event"})
            except AuditError as exc:
                raise UserError(f"promoted, but not recorded in the audit log: {exc}") from exc
            console.print(
                f"promoted {args.version} (recorded in {reg.root / 'promotions.jsonl'} and {audit})", soft_wrap=True
            )
        else:
            console.print(f"promoted {args.version} (recorded in {reg.root / 'promotions.jsonl'})", soft_wrap=True)
        return 0
    except RegistryError as exc:
        raise UserError(str(exc)) from exc


registry_cmd.add_arguments = _registry_args  # type: ignore[attr-defined]
command("registry", "list, show, verify and promote signed model versions")(registry_cmd)


# --- fedmart audit ---------------------------------------------------------------------------


def _audit_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="audit_cmd", required=True)
    v = sub.add_parser("verify", help="check the audit log's hash chain; names the first bad line")
    v.add_argument("path", nargs="?", type=Path, help="audit.jsonl (default: the newest outputs/*/audit.jsonl)")
    v.add_argument("--public-key", type=Path, help="also require every entry to be signed by this key")


@exit_on_user_error
def audit_cmd(args: argparse.Namespace) -> int:
    from federation.console import console
    from privacy.audit import verify_audit
    from privacy.signing import KeyFileError, load_public_key

    path = args.path
    if path is None:
        logs = [p for p in Path("outputs").glob("*/audit.jsonl") if p.is_file()]
        if not logs:
            raise UserError("no outputs/*/audit.jsonl found; pass the audit log's PATH")
        path = max(logs, key=lambda p: p.stat().st_mtime)
    if not Path(path).is_file():
        raise UserError(f"{path}: no audit log there")
    try:
        key = load_public_key(args.public_key) if args.public_key else None
    except KeyFileError as exc:
        raise UserError(str(exc)) from exc
    result = verify_audit(path, public_key=key)
    if result.ok:
        console.print(f"[green]ok[/]  {path}: {result.reason}", soft_wrap=True)
        return 0
    console.print(
        f"[red]FAILED[/]  {path} line {result.bad_line}: {result.reason} ({result.entries} good entries before it)",
        soft_wrap=True,
    )
    return 1


audit_cmd.add_arguments = _audit_args  # type: ignore[attr-defined]
command("audit", "verify a run's hash-chained audit log")(audit_cmd)


# --- fedmart serve ---------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, help="registry directory (default: the newest outputs/*/registry)")
    _public_key_arg(p)
    p.add_argument("--catalog", type=Path, required=True, help="the catalog.parquet the model was trained on")
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
    p.add_argument("--text-cache", type=Path, help="title embeddings cache (.npy)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


@exit_on_user_error
def serve_cmd(args: argparse.Namespace) -> int:
    from serving.config import ServeConfig, ServeError
    from serving.http import run_http

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServeConfig(
            registry=Path(args.registry) if args.registry else default_registry_root(),
            public_key=_need_public_key(args),
            catalog=Path(args.catalog),
            host=args.host,
            port=args.port,
            api_key=args.api_key or None,
            reload_interval=args.reload_interval,
            device=args.device,
            max_batch=args.max_batch,
            threads=args.threads,
            search=not args.no_search,
            text_cache=args.text_cache,
        )
        run_http(config, log_level=args.log_level)
    except (ServeError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc).splitlines()[0]) from exc
    return 0


serve_cmd.add_arguments = _serve_args  # type: ignore[attr-defined]
command("serve", "serve recommendations and search from the newest promoted, verified model")(serve_cmd)
