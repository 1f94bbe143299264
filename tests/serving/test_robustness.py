"""Robustness of ``fedmart serve`` under real HTTP: 20,000 mixed requests, and a schema-driven fuzz.

The server is the real CLI (``fedmart serve``) in a subprocess on a free 127.0.0.1
port with the search index built, so client and server each have a core. Every
valid request must succeed; every invalid one must be a 4xx that says why;
nothing may be a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from serving.schemas import MAX_HISTORY, MAX_K

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_REQUESTS = 20_000
CONCURRENCY = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory, support):
    """(base URL, world) of a real `fedmart serve` subprocess with /search ready."""
    root = tmp_path_factory.mktemp("live")
    world = support.make_world(root, num_items=300)
    port = _free_port()
    cmd = [
        sys.executable, "-c", "from fedmart.cli import main; main()", "serve",
        "--registry", str(world.registry_path), "--public-key", str(world.pub),
        "--catalog", str(world.catalog_path), "--port", str(port),
        "--text-cache", str(root / "title_emb.npy"), "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"fedmart serve exited:\n{proc.stdout.read()}")
        try:
            return httpx.get(f"{base}/model", timeout=2).json().get("search") == "ready"
        except httpx.HTTPError:
            return False

    try:
        assert support.wait_until(ready, timeout=300, interval=0.2), "server did not become ready"
        yield base, world
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the request mix ---------------------------------------------------------------------------


@dataclass
class Req:
    kind: str
    method: str
    path: str
    content: bytes | None = None
    content_type: str | None = "application/json"
    valid: bool = True
    expect_unknown: tuple[str, ...] = ()


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


def make_requests(world, n: int, seed: int = 0) -> list[Req]:
    rng = random.Random(seed)
    ids = [str(i) for i in world.catalog.item_id]
    depts = sorted(set(map(str, world.catalog.department)))
    words = sorted({w for t in world.catalog.title for w in str(t).split() if w.isalpha()})

    def hist(lo=0, hi=60):
        return rng.sample(ids, rng.randint(lo, hi))

    valid = [
        (30, lambda: Req("recommend", "POST", "/recommend", _body({
            "history": hist(1), "k": rng.randint(1, 50), "exclude_seen": rng.random() < 0.5,
            "department": rng.choice([None, *depts]),
        }))),
        (6, lambda: (lambda unk: Req("recommend_partial_unknown", "POST", "/recommend",
                                     _body({"history": hist(1, 10) + unk, "k": 5}), expect_unknown=tuple(unk)))(
            [f"ghost-{rng.randint(0, 10**9)}", "\u2603-snowman"])),
        (4, lambda: Req("recommend_fallback", "POST", "/recommend",
                        _body({"history": rng.choice([[], ["nope"]]), "k": rng.randint(1, 30)}))),
        (2, lambda: Req("recommend_int_ids", "POST", "/recommend", _body({"history": [1, 2, 3], "k": 3}))),
        (1, lambda: Req("search", "POST", "/search", _body({
            "query": " ".join(rng.sample(words, rng.randint(1, 3))), "k": rng.randint(1, 20),
            "history": rng.choice([[], hist(1, 5)]), "department": rng.choice([None, *depts]),
        }))),
        (4, lambda: Req("item", "GET", f"/items/{rng.choice(ids)}", None, None)),
        (2, lambda: Req("model", "GET", "/model", None, None)),
        (2, lambda: Req("healthz", "GET", "/healthz", None, None)),
    ]  # fmt: skip
    bad_bodies = [
        {"history": [], "k": 0},
        {"history": [], "k": -5},
        {"history": [], "k": MAX_K + 1},
        {"history": [], "k": 10**20},
        {"history": [], "k": 301},  # more than the catalog
        {"history": [], "k": "ten"},
        {"history": [], "k": 1.5},
        {"history": [], "k": None},
        {"history": [], "k": []},
        {"history": "i1"},
        {"history": 5},
        {"history": {"a": 1}},
        {"history": [[]]},
        {"history": [{}]},
        {"history": [None]},
        {"history": [""]},
        {"history": ["x" * 300]},
        {"history": ["i"] * (MAX_HISTORY + 1)},
        {"history": [], "department": "Nowhere"},
        {"history": [], "department": ["Books"]},
        {"history": [], "exclude_seen": "maybe"},
        {"history": [], "exclude_seen": 2},
        {"history": [], "unknown_field": 1},
        [],
        [1, 2],
        "history",
        None,
        42,
    ]
    bad_raw = [
        b"{",
        b'{"history": [}',
        b'{"history": []',
        b"\xff\xfe\x00garbage",
        b'{"k": 3} trailing',
        b"",
        b'{"k": NaN}',
        b'{"k": Infinity}',
        b'{"history": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"history": ["' + b"a" * (1 << 20) + b'"]}',  # over the body limit
    ]
    bad_search = [
        {"query": ""},
        {"query": "   "},
        {"query": "q" * 513},
        {"k": 5},
        {"query": "lamp", "k": 0},
        {"query": "lamp", "department": "Nowhere"},
        {"query": ["lamp"]},
    ]
    invalid = [
        (10, lambda: Req("bad_body", "POST", "/recommend", _body(rng.choice(bad_bodies)), valid=False)),
        (6, lambda: Req("bad_json", "POST", "/recommend", rng.choice(bad_raw), valid=False)),
        (2, lambda: Req("bad_content_type", "POST", "/recommend", _body({"history": []}), "text/plain", False)),
        (3, lambda: Req("bad_search", "POST", "/search", _body(rng.choice(bad_search)), valid=False)),
        (3, lambda: Req("unknown_item", "GET", f"/items/ghost-{rng.randint(0, 99)}", None, None, False)),
        (2, lambda: Req("unknown_path", "GET", rng.choice(["/", "/nope", "/items"]), None, None, False)),
        (2, lambda: Req("bad_method", rng.choice(["GET", "PUT", "DELETE"]), "/recommend", None, None, False)),
        (1, lambda: Req("bad_method_model", "POST", "/model", None, None, False)),
    ]  # fmt: skip
    makers = valid + invalid
    weights = [w for w, _ in makers]
    return [rng.choices(makers, weights)[0][1]() for _ in range(n)]


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes, bool]:
    """Send one request, read one response: (status, body, server wants the connection closed)."""
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status, length, close = int(head[9:12]), 0, False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line[15:])
        elif line.startswith(b"connection:") and b"close" in line:
            close = True
    return status, await reader.readexactly(length), close


def _raw(req: Req, host: str) -> bytes:
    """The request as bytes: a minimal HTTP/1.1 keep-alive client costs far less CPU than httpx."""
    body = req.content or b""
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if req.content_type:
        lines.append(f"Content-Type: {req.content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _send_all(base: str, requests: list[Req]) -> list[tuple[Req, int, dict | None]]:
    host, port = base.removeprefix("http://").split(":")
    results: list[tuple[Req, int, dict | None]] = []
    it = iter(requests)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for req in it:
                try:
                    status, raw_body, close = await _exchange(reader, writer, _raw(req, f"{host}:{port}"))
                except (ConnectionError, asyncio.IncompleteReadError):
                    # The server may answer early (413) and close; the request was still answered.
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    status, raw_body, close = await _exchange(reader, writer, _raw(req, f"{host}:{port}"))
                try:
                    body = json.loads(raw_body)
                except ValueError:
                    body = None
                results.append((req, status, body))
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def test_twenty_thousand_mixed_requests_no_5xx_and_every_invalid_one_explained(live):
    base, world = live
    requests = make_requests(world, N_REQUESTS)

    t0 = time.perf_counter()
    results = asyncio.run(_send_all(base, requests))
    seconds = time.perf_counter() - t0

    assert len(results) == N_REQUESTS
    statuses = Counter(status for _, status, _ in results)
    by_kind = Counter((req.kind, status) for req, status, _ in results)
    print(f"\n{N_REQUESTS} requests in {seconds:.1f}s ({N_REQUESTS / seconds:.0f}/s); statuses {dict(statuses)}")
    assert not [s for s in statuses if s >= 500], by_kind
    for req, status, body in results:
        if req.valid:
            assert status == 200, (req.kind, status, body)
            if req.kind.startswith("recommend") or req.kind == "search":
                assert body["model_version"] == world.versions[-1]
            if req.expect_unknown:
                assert body["unknown_items"] == list(req.expect_unknown)
            if req.kind == "recommend_fallback":
                assert body["fallback"] == "popularity"
        else:
            assert 400 <= status < 500, (req.kind, status, req.content[:200] if req.content else None)
            assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (req.kind, body)


# --- schema-driven fuzz (schemathesis) -----------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(live):
    base, _ = live
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_finds_no_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])
