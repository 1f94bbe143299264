"""The coordinator's node-facing port: a TLS front that forwards Flower's Fleet API and nothing else.

Why it exists. Flower 1.41's SuperLink is one HTTP app on one port that serves the Fleet API
(``/v1/fleet/*``, the nodes'), the Control API (``/v1/control/*``: register node keys, start
and stop runs, ...) and the Runtime API (``/v1/runtime/*``, the ServerApp's). What Flower
offers to separate them, read from its 1.41 source:

* Control authentication is a plugin: the open-source build has only the no-op one, which
  accepts every request; OIDC account authentication (``FLWR_OIDC_ENABLED=1``) needs Flower
  Enterprise (``flwr.ee``) and otherwise exits with "unavailable in this Flower distribution".
* ``--control-api-address`` and ``--fleet-api-address`` are deprecated: they only place the
  legacy gRPC servers (behind internal switches); the HTTP app always mounts all three routers.
* The SuperLink's TLS (uvicorn) has no client certificates, and node authentication
  (``--enable-supernode-auth``) guards ``/v1/fleet/*`` only.

So a node that can reach the port could register more node keys (Sybils), submit an app (code
execution on the coordinator) and stop runs. ``fedmart coordinate`` therefore binds the
SuperLink to ``127.0.0.1:deploy.control_port`` (its own ``flwr`` CLI and the ServerApp use that)
and puts this gate on ``deploy.host:deploy.port``, the only port nodes are given.

What it forwards: ``POST`` to exactly the twelve Fleet routes in :data:`FLEET_ROUTES` (the ones
Flower's SuperNode calls, ``flwr/supernode/fleet_http_client.py``), with the body and the
end-to-end headers (the node's signed timestamp among them), over TLS to the SuperLink, which
still checks node authentication itself. Everything else (any other path or method, including
``/v1/control/*``, ``/v1/runtime/*``, ``/health``, ``/docs``) is answered ``403`` here and logged;
the SuperLink never sees it. Run it with ``python -m fedmart.fleet_gate``.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

__all__ = [
    "FLEET_ROUTES",
    "MAX_BODY_BYTES",
    "MEMBERSHIP_ROUTES",
    "create_gate",
    "gate_argv",
    "main",
    "node_key_fingerprint",
]

log = logging.getLogger("fedmart.fleet_gate")

FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# The routes by which a node joins and leaves: logged with the key's SHA256 fingerprint (the one
# `fedmart nodes list` shows beside the node's name), so the gate's log tells nodes apart.
MEMBERSHIP_ROUTES = frozenset(f"/v1/fleet/{name}" for name in ("register-node", "activate-node", "deactivate-node"))
FLEET_PUBLIC_KEY_HEADER = "flwr-public-key"  # flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER: base64 PEM
MAX_BODY_BYTES = 512 * 1024 * 1024  # Flower's own largest message (GRPC_MAX_MESSAGE_LENGTH)
# Hop-by-hop headers (RFC 9110 7.6.1) and what httpx recomputes; everything else passes through.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "content-encoding",
    }
)
REFUSAL = "fedmart: only Flower's Fleet API (POST /v1/fleet/...) is served on this port\n"


def create_gate(upstream: str, ca_cert: Path, *, timeout: float = 300.0) -> Starlette:
    """The gate's ASGI app: Fleet routes to ``https://<upstream>`` (verified against ``ca_cert``), the rest 403."""
    verify = ssl.create_default_context(cafile=str(ca_cert))
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=f"https://{upstream}", verify=verify, timeout=timeout, follow_redirects=False
        ) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        peer = request.client.host if request.client else "?"
        if request.method != "POST" or path not in FLEET_ROUTES:
            log.warning("refused %s %s from %s: not a Fleet API route", request.method, path, peer)
            return PlainTextResponse(REFUSAL, status_code=403)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return PlainTextResponse(f"request body over {MAX_BODY_BYTES} bytes\n", status_code=413)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return PlainTextResponse(f"request body over {MAX_BODY_BYTES} bytes\n", status_code=413)
        except ClientDisconnect:
            return Response(status_code=400)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        try:
            # The allow-listed path string, not the request's raw bytes: nothing else can reach the SuperLink.
            upstream_response = await state["client"].post(path, content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s from %s: %s", path, peer, exc)
            response: Response = PlainTextResponse("the SuperLink is not reachable\n", status_code=502)
        else:
            out = {k: v for k, v in upstream_response.headers.items() if k.lower() not in _HOP}
            response = Response(upstream_response.content, status_code=upstream_response.status_code, headers=out)
        if path in MEMBERSHIP_ROUTES:  # rare events: which key came and went, from where
            log.info(
                "%s: node key %s from %s: HTTP %d",
                path.rsplit("/", 1)[1],
                node_key_fingerprint(request.headers.get(FLEET_PUBLIC_KEY_HEADER, "")),
                peer,
                response.status_code,
            )
        return response

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def node_key_fingerprint(header: str) -> str:
    """The SHA256 fingerprint (OpenSSH form) of the key a SuperNode sends in its signed Fleet requests."""
    from base64 import b64decode

    from cryptography.hazmat.primitives import serialization

    from privacy.pki import node_public_key_openssh, ssh_fingerprint

    try:
        key = serialization.load_pem_public_key(b64decode(header, validate=True))
        return ssh_fingerprint(node_public_key_openssh(key))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return "(no key)"


def gate_argv(*, host: str, port: int, upstream: str, certs: Path) -> list[str]:
    """The command line that runs the gate (``fedmart coordinate`` supervises it like the SuperLink)."""
    import sys

    return [
        sys.executable, "-m", "fedmart.fleet_gate",
        "--host", host, "--port", str(port), "--upstream", upstream, "--certs", str(certs),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from privacy.pki import PkiLayout

    p = argparse.ArgumentParser(prog="python -m fedmart.fleet_gate", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="where nodes connect (deploy.host)")
    p.add_argument("--port", type=int, required=True, help="the node-facing port (deploy.port)")
    p.add_argument("--upstream", required=True, help="the SuperLink, HOST:PORT (127.0.0.1:deploy.control_port)")
    p.add_argument("--certs", type=Path, required=True, help="the deployment's certs directory (fedmart certs)")
    args = p.parse_args(argv)
    from fedmart.console import setup_logging

    setup_logging(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is too many
    layout = PkiLayout(args.certs)
    app = create_gate(args.upstream, layout.ca_cert)
    log.info("Fleet gate on https://%s:%d -> https://%s (Fleet API only)", args.host, args.port, args.upstream)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(layout.server_cert),
        ssl_keyfile=str(layout.server_key),
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
