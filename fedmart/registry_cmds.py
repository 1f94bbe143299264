"""``fedmart registry`` and ``fedmart audit``: signed model versions and the hash-chained audit log."""

from __future__ import annotations

import argparse
import getpass
import json
import os
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error

__all__ = [
    "PUBLIC_KEY_ENV",
    "SIGNING_KEY_ENV",
    "default_registry_root",
    "public_key_arg",
    "need_public_key",
    "registry_cmd",
    "audit_cmd",
]

PUBLIC_KEY_ENV = "FEDMART_PUBLIC_KEY"
SIGNING_KEY_ENV = "FEDMART_SIGNING_KEY"


def default_registry_root(outputs: Path = Path("outputs")) -> Path:
    """The newest ``outputs/*/registry`` (by modification time)."""
    candidates = [p for p in outputs.glob("*/registry") if p.is_dir()]
    if not candidates:
        raise UserError(f"no {outputs}/*/registry found; pass --root DIR (a run's registry directory)")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def public_key_arg(p: argparse.ArgumentParser) -> None:
    """``--public-key PEM`` (default ``$FEDMART_PUBLIC_KEY``)."""
    p.add_argument(
        "--public-key",
        type=Path,
        default=os.environ.get(PUBLIC_KEY_ENV),
        help=f"the signer's Ed25519 public key (PEM .pub; default ${PUBLIC_KEY_ENV})",
    )


def need_public_key(args: argparse.Namespace) -> Path:
    """The ``--public-key`` given, or a user error that says how to give one."""
    if not args.public_key:
        raise UserError(f"pass --public-key PEM (the signer's .pub file) or set ${PUBLIC_KEY_ENV}")
    return Path(args.public_key)


def _open_registry(args: argparse.Namespace, *, need_key: bool, signing: bool = False):
    from federation.registry import ModelRegistry, RegistryError
    from privacy.signing import KeyFileError

    root = Path(args.root) if args.root else default_registry_root()
    if not root.is_dir():
        raise UserError(f"{root}: no registry there; pass --root DIR")
    key = need_public_key(args) if need_key else (Path(args.public_key) if args.public_key else None)
    private = None
    if signing:
        private = getattr(args, "signing_key", None) or os.environ.get(SIGNING_KEY_ENV)
        if not private:
            what = (
                "publish-catalog signs the catalog"
                if args.registry_cmd == "publish-catalog"
                else "promote signs its record"
            )
            raise UserError(f"{what}: pass --signing-key KEY (the coordinator's) or set ${SIGNING_KEY_ENV}")
    try:
        return ModelRegistry(root, public_key_path=key, private_key_path=Path(private) if private else None)
    except KeyFileError as exc:
        hint = f"; {args.registry_cmd} never creates a key: pass the coordinator's --signing-key" if signing else ""
        raise UserError(f"{exc}{hint}") from exc
    except RegistryError as exc:
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
    pr = sub.add_parser("promote", help="mark a verified version for serving (a signed, counted promotions.jsonl line)")
    pr.add_argument("version")
    pc = sub.add_parser(
        "publish-catalog", help="sign a catalog as the newest catalog version (what `fedmart serve` swaps in)"
    )
    pc.add_argument("--catalog", type=Path, required=True, help="the catalog.parquet to publish")
    cl = sub.add_parser("catalogs", help="signed catalog versions, lowest counter first")
    kg = sub.add_parser("keygen", help="create the coordinator's Ed25519 signing key, once, at set-up")
    kg.add_argument("path", type=Path, help="where the private key goes (e.g. keys/coordinator.key); never replaced")
    for sp in (ls, s, v, pr, pc, cl):
        _registry_common(sp, sub=True)
    for sp, what in ((pr, "promotion"), (pc, "catalog version")):
        sp.add_argument(
            "--signing-key",
            "--key",
            dest="signing_key",
            type=Path,
            default=None,
            help=f"the coordinator's Ed25519 private key that signs the {what} (default ${SIGNING_KEY_ENV})",
        )
        sp.add_argument("--by", default=None, help="who signs (default: the current user)")
        sp.add_argument(
            "--audit", type=Path, default=None, help=f"audit log to record the {what} in (default: ROOT/../audit.jsonl)"
        )


@exit_on_user_error
def registry_cmd(args: argparse.Namespace) -> int:
    from rich.table import Table

    from federation.registry import RegistryError
    from fedmart.console import console

    cmd = args.registry_cmd
    if cmd == "keygen":
        return _keygen(Path(args.path))
    if cmd == "publish-catalog":
        return _publish_catalog(args)
    reg = _open_registry(args, need_key=cmd in ("verify", "promote", "catalogs"), signing=cmd == "promote")
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
        if cmd == "catalogs":
            names = reg.catalogs.names()
            if not names:
                console.print(f"{reg.root}: no signed catalog versions yet")
                return 0
            for name in names:
                ok, reason = reg.catalogs.verify(name)
                m = reg.catalogs.show(name)
                console.print(
                    f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {name}: {m.get('items')} items "
                    f"(+{m.get('items_added') or 0} -{m.get('items_removed') or 0} "
                    f"against {m.get('parent') or 'none'}), "
                    f"by {m.get('by')} at {str(m.get('created_at'))[:19]}" + ("" if ok else f": {reason}"),
                    soft_wrap=True,
                )
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
            if not args.version:  # the whole registry: its signed catalog versions too
                for name in reg.catalogs.names():
                    ok, reason = reg.catalogs.verify(name)
                    bad += not ok
                    reason = reason.removeprefix(f"catalog {name}: ")
                    console.print(
                        f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  catalog {name}: {reason}", soft_wrap=True
                    )
            promotions = reg.promotions()
            for line, reason in promotions.refused.items():
                bad += 1
                console.print(f"[red]FAILED[/]  promotions.jsonl line {line}: {reason}", soft_wrap=True)
            newest, why = promotions.newest()
            if newest is not None:
                console.print(f"newest promotion: #{newest['counter']} {newest['version']}", soft_wrap=True)
            elif why and (promotions.valid or promotions.refused):
                console.print(f"[red]no promotion to serve[/]: {why}", soft_wrap=True)
            if bad:
                console.print(f"[red]{bad} version(s) or promotion(s) failed verification[/]", soft_wrap=True)
            return 1 if bad else 0
        # promote
        record = reg.promote(args.version, by=args.by or getpass.getuser())
        audit = args.audit or reg.root.parent / "audit.jsonl"
        if args.audit or audit.exists():
            from privacy.audit import AuditError, AuditLog

            try:
                AuditLog(audit, private_key=reg.signing_key).append(
                    "promotion", **{k: v for k, v in record.items() if k != "event"}
                )
            except AuditError as exc:
                raise UserError(f"promoted, but not recorded in the audit log: {exc}") from exc
            console.print(
                f"promoted {args.version} as #{record['counter']} (signed, in {reg.root / 'promotions.jsonl'} "
                f"and {audit})",
                soft_wrap=True,
            )
        else:
            console.print(
                f"promoted {args.version} as #{record['counter']} (signed, in {reg.root / 'promotions.jsonl'})",
                soft_wrap=True,
            )
        return 0
    except RegistryError as exc:
        raise UserError(str(exc)) from exc


def _publish_catalog(args: argparse.Namespace) -> int:
    """``registry publish-catalog``: the catalog signed as the newest catalog version, and an audit entry."""
    from federation.catalog import Catalog
    from federation.catalogs import CatalogStoreError
    from fedmart.console import console

    catalog = Catalog.load(args.catalog)  # a CatalogError is a user error: one line, exit 2
    if args.root is None:
        raise UserError("publish-catalog writes into a registry: pass --root DIR (the registry `fedmart serve` reads)")
    Path(args.root).mkdir(parents=True, exist_ok=True)
    reg = _open_registry(args, need_key=False, signing=True)
    try:
        version = reg.catalogs.publish(catalog, by=args.by or getpass.getuser())
    except CatalogStoreError as exc:
        raise UserError(str(exc)) from exc
    m = version.metadata
    audit = args.audit or reg.root.parent / "audit.jsonl"
    where = str(reg.catalogs.dir / version.name)
    if args.audit or audit.exists():
        from privacy.audit import AuditError, AuditLog

        fields = {
            k: m[k]
            for k in (
                "name",
                "counter",
                "catalog_version",
                "parent",
                "items",
                "items_added",
                "items_removed",
                "by",
                "key_id",
            )
        }
        try:
            AuditLog(audit, private_key=reg.signing_key).append("catalog_published", **fields)
        except AuditError as exc:
            raise UserError(f"published, but not recorded in the audit log: {exc}") from exc
        where += f" and {audit}"
    console.print(
        f"published catalog {version.version} as #{version.counter} ({m['items']} items, "
        f"+{m['items_added'] or 0} -{m['items_removed'] or 0} against {m['parent'] or 'none'}; signed, in {where})",
        soft_wrap=True,
    )
    return 0


def _keygen(path: Path) -> int:
    from fedmart.console import console
    from privacy.signing import key_fingerprint, load_or_create_keypair, public_key_path_for

    if path.exists():
        raise UserError(f"{path} exists; keygen never replaces a signing key (versions signed by it would be orphaned)")
    _, public = load_or_create_keypair(path)
    console.print(
        f"created {path} (0600, key id {key_fingerprint(public)}); its public key {public_key_path_for(path)} "
        "is what `fedmart serve --public-key` and `fedmart registry verify` take",
        soft_wrap=True,
    )
    return 0


registry_cmd.add_arguments = _registry_args  # type: ignore[attr-defined]
command("registry", "list, show, verify and promote signed model versions; make the signing key")(registry_cmd)


# --- fedmart audit ---------------------------------------------------------------------------


def _audit_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="audit_cmd", required=True)
    v = sub.add_parser("verify", help="check the audit log's hash chain; names the first bad line")
    v.add_argument("path", nargs="?", type=Path, help="audit.jsonl (default: the newest outputs/*/audit.jsonl)")
    v.add_argument("--public-key", type=Path, help="also require every entry to be signed by this key")


@exit_on_user_error
def audit_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console
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
