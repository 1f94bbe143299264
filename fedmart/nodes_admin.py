"""``fedmart nodes``: register, list and unregister node keys on a running coordinator's SuperLink.

Nodes are told apart by the name they were registered under (the ``.pub`` file's stem, which
``fedmart node keygen --name NAME`` writes) and by the SHA-256 fingerprint of their key, the
one ``fedmart node keygen`` printed for the department to read out over the phone. Both come
from the SuperLink's own records (Flower's Control API ``ListNodes``: ``name``, ``public_key``),
over loopback, with the run's ``ca.pem``; Flower's ``flwr supernode list`` shows neither.

:func:`register_node_keys` is also how ``fedmart coordinate`` registers ``deploy.node_keys`` at start.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmart.cli import command
from fedmart.errors import UserError, exit_on_user_error
from fedmart.supervise import CONNECTION

__all__ = ["ControlClient", "NodeRow", "Registration", "nodes_cmd", "register_node_keys", "resolve_node"]

_KEY_IN_USE = 23  # Flower's ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE


@dataclass(frozen=True)
class NodeRow:
    """One node as the SuperLink records it."""

    name: str
    node_id: int
    status: str  # registered | online | offline | unregistered
    fingerprint: str  # SHA256:... of the OpenSSH key, as `fedmart node keygen` and `ssh-keygen -lf` print it
    public_key: str  # the OpenSSH public key line
    registered_at: str
    online_at: str
    offline_at: str

    def to_json(self) -> dict[str, str | int]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Registration:
    """What registering one key did."""

    name: str
    status: str  # "registered" | "already registered"
    node_id: int
    fingerprint: str

    def line(self) -> str:
        return f"{self.name}: {self.status}, node id {self.node_id}, key {self.fingerprint}"


def _openssh(pem: bytes, comment: str) -> tuple[str, str]:
    """(OpenSSH public key line, its SHA256 fingerprint) of a PEM SubjectPublicKeyInfo, as Flower stores keys.

    The line ends with ``comment`` (the node's name), as ``fedmart node keygen`` wrote it.
    """
    from cryptography.hazmat.primitives import serialization

    from privacy.pki import node_public_key_openssh, ssh_fingerprint

    try:
        key = serialization.load_pem_public_key(pem)
        line = node_public_key_openssh(key, comment)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return "", "(unreadable key)"
    return line.decode().strip(), ssh_fingerprint(line)


class ControlClient:
    """The coordinator's SuperLink, over its loopback Control API; every failure is a one-line UserError.

    ``where`` names what the operator passed (the run directory), for the error lines.
    """

    def __init__(self, address: str, root_cert: Path, *, where: str) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self.address, self.where = address, where
        try:
            ca = root_cert.read_bytes()
        except OSError as exc:
            raise UserError(f"{root_cert}: cannot read the deployment's CA certificate ({exc.strerror})") from exc
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=ca,
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    @classmethod
    def from_home(cls, home: Path, *, where: str) -> ControlClient:
        """The connection ``fedmart coordinate`` wrote to ``FLWR_HOME/config.toml`` (``write_flwr_config``)."""
        import tomllib

        path = home / "config.toml"
        try:
            conn = tomllib.loads(path.read_text())["superlink"][CONNECTION]
            return cls(str(conn["address"]), Path(conn["root-certificates"]), where=where)
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{where}: no coordinator there ({path} unreadable: {exc}); pass outputs/<run>") from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn, request, *, expected: tuple[int, ...] = ()):
        """``fn(request)``; Flower's API errors with a code in ``expected`` raise :class:`_FlowerRefusal`."""
        import httpx

        try:
            return fn(request)
        except httpx.HTTPStatusError as exc:
            code, detail = _flower_code(exc.response), _flower_detail(exc.response)
            if code in expected:
                raise _FlowerRefusal(code, detail) from exc
            raise UserError(f"the SuperLink at https://{self.address} refused to {what}: {detail}") from exc
        except httpx.HTTPError as exc:
            if "certificate" in str(exc).lower():
                raise UserError(
                    f"TLS to https://{self.address} failed for {self.where}: the SuperLink listening there does not "
                    "present a certificate of this run's CA (another coordinator on that port?)"
                ) from exc
            raise UserError(
                f"no coordinator answers at https://{self.address} for {self.where} ({type(exc).__name__}): "
                f"it is not running; start it (fedmart coordinate, or fedmart coordinate resume={self.where})"
            ) from exc

    def list(self) -> list[NodeRow]:
        """Every node the SuperLink knows, by name then registration time."""
        from flwr.proto.control_pb2 import ListNodesRequest

        res = self._call("list nodes", self._client.ListNodes, ListNodesRequest())
        rows = []
        for n in res.nodes_info:
            line, fp = _openssh(bytes(n.public_key), n.name)
            rows.append(
                NodeRow(
                    name=n.name or "(no name)",
                    node_id=int(n.node_id),
                    status=n.status,
                    fingerprint=fp,
                    public_key=line,
                    registered_at=n.registered_at,
                    online_at=n.last_activated_at,
                    offline_at=n.last_deactivated_at or n.unregistered_at,
                )
            )
        return sorted(rows, key=lambda r: (r.name, r.registered_at))

    def register(self, pub: Path, name: str) -> Registration:
        """Register ``pub`` (OpenSSH) under ``name``; a key already registered is reported with its node id."""
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest

        from privacy.pki import PkiError, load_node_public_key, ssh_fingerprint

        try:
            text = pub.read_bytes()
            key = load_node_public_key(text)
        except (OSError, PkiError) as exc:
            raise UserError(f"{pub}: {exc}") from exc
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        fingerprint = ssh_fingerprint(text)
        request = RegisterNodeRequest(public_key=pem, name=name)
        try:
            res = self._call(f"register {pub}", self._client.RegisterNode, request, expected=(_KEY_IN_USE,))
        except _FlowerRefusal:
            known = [r for r in self.list() if r.fingerprint == fingerprint and r.status != "unregistered"]
            node_id = known[0].node_id if known else 0
            registered_as = known[0].name if known else name
            return Registration(registered_as, "already registered", node_id, fingerprint)
        return Registration(name, "registered", int(res.node_id), fingerprint)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self._call(f"unregister node {node_id}", self._client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))


class _FlowerRefusal(Exception):
    """The SuperLink answered with one of Flower's API errors (code, detail)."""

    def __init__(self, code: int | None, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def _flower_code(response) -> int | None:
    try:
        code = response.json().get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, int) else None


def _flower_detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail or f"HTTP {response.status_code}")


def _name_of(pub: Path) -> str:
    """The name a key is registered under: its file's stem (``books.pub`` -> ``books``)."""
    from privacy.pki import valid_node_name

    try:
        return valid_node_name(pub.name.removesuffix(".pub"))
    except ValueError as exc:
        raise UserError(f"{pub}: {exc}; rename the file NAME.pub (the node's name)") from exc


def register_node_keys(client: ControlClient, pubs: list[Path]) -> list[Registration]:
    """Register node public keys (``NAME.pub``, each under ``NAME``); already registered ones are fine.

    Every file is checked before any is registered; any other failure is a UserError.
    """
    names = [_name_of(p) for p in pubs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two keys would be registered as {', '.join(dupes)}: give each node's .pub its own name")
    from privacy.pki import PkiError, load_node_public_key

    for pub in pubs:
        try:
            load_node_public_key(pub.read_bytes())
        except (OSError, PkiError) as exc:
            raise UserError(f"{pub}: {exc}") from exc
    return [client.register(pub, name) for pub, name in zip(pubs, names, strict=True)]


def resolve_node(rows: list[NodeRow], which: str) -> NodeRow:
    """The node a user means by ``which``: its name (among nodes not yet unregistered), else its node id."""
    live = [r for r in rows if r.status != "unregistered"]
    named = [r for r in live if r.name == which]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        choices = "; ".join(f"node id {r.node_id} ({r.status}, key {r.fingerprint})" for r in named)
        raise UserError(f"{len(named)} registered nodes are named {which}: {choices}; pass the node id")
    if which.isdigit():
        by_id = [r for r in live if r.node_id == int(which)]
        if by_id:
            return by_id[0]
    raise UserError(f"no registered node is named or numbered {which!r}; `fedmart nodes --run RUN list` shows them")


# --- fedmart nodes ------------------------------------------------------------------------------


def _nodes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="the coordinator's run directory (outputs/<run>)")
    sub = p.add_subparsers(dest="nodes_cmd", required=True)
    r = sub.add_parser("register", help="register node public keys (NAME.pub, each under NAME) with the SuperLink")
    r.add_argument("pub", nargs="+", type=Path)
    ls = sub.add_parser("list", help="registered nodes: name, node id, status and full key fingerprint")
    ls.add_argument("--format", choices=["text", "json"], default="text", help="text: one field per line (default)")
    ls.add_argument("--all", action="store_true", help="also nodes already unregistered")
    u = sub.add_parser("unregister", help="unregister a node by its name or node id (key rotation, revocation)")
    u.add_argument("node", metavar="NAME_OR_ID")


def _when(iso: str) -> str:
    """An ISO time from the SuperLink as ``2026-12-01 07:09:25 UTC``."""
    from datetime import UTC, datetime

    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def _print_rows(rows: list[NodeRow]) -> None:
    from fedmart.console import console

    if not rows:
        console.print("no nodes registered", markup=False, highlight=False)
    for r in rows:
        since = {"online": r.online_at, "offline": r.offline_at, "unregistered": r.offline_at}.get(r.status, "")
        lines = [
            f"{r.name}: {r.status}" + (f" since {_when(since)}" if since else ""),
            f"  node id      {r.node_id}",
            f"  fingerprint  {r.fingerprint}",
            f"  registered   {_when(r.registered_at)}",
        ]
        # One field per line, never wrapped or cut: the fingerprint is read out over the phone.
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


@exit_on_user_error
def nodes_cmd(args: argparse.Namespace) -> int:
    from fedmart.console import console

    home = args.run / "flwr" / "home"
    if not (home / "config.toml").is_file():
        raise UserError(f"{args.run}: no coordinator there (no flwr/home/config.toml); pass the run directory")
    with ControlClient.from_home(home, where=str(args.run)) as client:
        if args.nodes_cmd == "register":
            for reg in register_node_keys(client, list(args.pub)):
                console.print(reg.line(), markup=False, highlight=False, soft_wrap=True)
            return 0
        rows = client.list()
        if args.nodes_cmd == "list":
            shown = rows if args.all else [r for r in rows if r.status != "unregistered"]
            if args.format == "json":
                print(json.dumps({"nodes": [r.to_json() for r in shown]}, indent=1))
            else:
                _print_rows(shown)
            return 0
        node = resolve_node(rows, args.node)
        client.unregister(node.node_id)
        console.print(
            f"{node.name}: unregistered, node id {node.node_id}, key {node.fingerprint}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0


nodes_cmd.add_arguments = _nodes_args  # type: ignore[attr-defined]
command("nodes", "register, list and unregister node keys on a running coordinator")(nodes_cmd)
