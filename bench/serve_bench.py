"""Latency and throughput of ``fedmart serve`` under real HTTP load on 127.0.0.1.

For each catalog size: a synthetic catalog, a randomly initialised model published
as a signed version and promoted, then ``fedmart serve`` started as a subprocess.
``--model sasrec`` (the default) is the ID-only SASRec; ``--model sasrec_text`` the tied
text tower (``conf/model/sasrec_text.yaml``), whose frozen MiniLM rows of the catalog's
item texts are embedded once into ``--text-cache`` (kept across runs) and read from there
by both this process and the server (``fedmart serve --text-cache``).
The load generator is this process: a minimal HTTP/1.1 keep-alive client on asyncio
(one connection per concurrent user, closed loop), so the client's own overhead
stays far below the server's. The bare model forward (``score_last`` + top-k, batch
1, the server's thread count) is measured in this process before the server starts.

    python bench/serve_bench.py                        # 10k and 100k items, concurrency 1/16/64
    python bench/serve_bench.py --items 10000 --duration 5 --concurrency 1 16
    python bench/serve_bench.py --items 10000 --model sasrec_text   # the text tower

Prints a Markdown table and writes JSON next to it (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.synthetic import generate
from conf.settings import SyntheticSettings
from federation.globalmodel import build_model, get_weights
from federation.registry import ModelRegistry

# The model group each --model is built with (conf/model/*.yaml; the rest are ModelSettings defaults).
MODELS: dict[str, dict[str, Any]] = {
    "sasrec": {"hidden": 64, "layers": 2, "heads": 2},
    "sasrec_text": {"name": "sasrec_text", "hidden": 64, "layers": 2, "heads": 2, "item_bias": True},
}


def text_cache_file(cache_dir: Path) -> Path:
    """The ``--text-cache`` file for ``cache_dir``: the tower's item-text rows are cached beside it, one
    ``item_text_emb-<catalog version>.npy`` per catalog, by ``build_model`` and the server alike."""
    return cache_dir / "title_emb.npy"


def make_registry(
    root: Path, num_items: int, *, seed: int = 0, model_name: str = "sasrec", text_cache: Path | None = None
) -> tuple[Path, Path, Path, torch.nn.Module]:
    """Catalog, signed + promoted random model; returns (registry, public key, catalog, model).

    ``text_cache``: the directory of the text tower's embeddings (``model_name="sasrec_text"``).
    The synthetic catalog is deterministic in ``num_items`` and ``seed``, so its version, and
    the cached rows, are the same on every run.
    """
    catalog, inter = generate(SyntheticSettings(num_users=2_000, num_items=num_items, seed=seed))
    catalog_path = catalog.save(root / "catalog.parquet")
    cache = text_cache_file(text_cache) if text_cache is not None else None
    model = build_model(catalog, MODELS[model_name], 50, seed=seed, text_cache=cache).eval()
    reg = ModelRegistry(root / "registry", private_key_path=root / "keys" / "signing.pem", create_key=True)
    version = reg.publish(
        get_weights(model),
        run="bench",
        round=1,
        config_hash="bench",
        catalog_version=catalog.version,
        model_config=model.config.to_dict(),
        metrics={},
        privacy={},
        parent=None,
        popularity=np.bincount(inter.item, minlength=num_items + 1),
    )
    reg.promote(version, by="bench")
    return root / "registry", root / "keys" / "signing.pem.pub", catalog_path, model


def bare_forward(
    model: torch.nn.Module, num_items: int, *, batch: int, iters: int, k: int = 10, score=None, history: int = 0
) -> float:
    """Median seconds of ``score_last`` (or ``score``) + top-k on a (batch, max_len) left-padded history.

    ``history``: items per row (0: a full ``max_len`` history).
    """
    rng = np.random.default_rng(0)
    max_len = model.config.max_len
    score = score or model.score_last
    h = history or max_len
    times = []
    with torch.inference_mode():
        for i in range(iters + 20):
            seq = torch.zeros(batch, max_len, dtype=torch.long)
            seq[:, max_len - h :] = torch.from_numpy(rng.integers(1, num_items + 1, size=(batch, h)))
            t0 = time.perf_counter()
            torch.topk(score(seq), k, dim=1)
            if i >= 20:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry: Path, pub: Path, catalog: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable, "-c", "from fedmart.cli import main; main()", "serve",
        "--registry", str(registry), "--public-key", str(pub), "--catalog", str(catalog),
        "--port", str(port), "--no-search", "--log-level", "warning", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 120 s")


def request_bytes(body: dict, port: int) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    return status, body


async def load(port: int, requests: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    """Closed-loop load: ``concurrency`` connections, each sending the next request when answered."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def user(u: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = u
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                writer.write(requests[i % len(requests)])
                status, _ = await _read_response(reader)
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    latencies.append(t1 - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                i += concurrency
        finally:
            writer.close()

    await asyncio.gather(*(user(u) for u in range(concurrency)))
    lat = np.asarray(latencies)
    errors = sum(v for s, v in statuses.items() if s != 200)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "statuses": statuses,
        "rps": len(lat) / duration,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "mean_ms": float(lat.mean() * 1e3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_stats(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()["batching"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency level")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--history", type=int, default=20, help="mean history length of a request")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, in the server and the bare forward")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--model", choices=sorted(MODELS), default="sasrec", help="ID-only SASRec or the text tower")
    ap.add_argument(
        "--text-cache",
        type=Path,
        default=Path("outputs/bench/text-cache"),
        help="directory of the text tower's MiniLM rows, per catalog version (sasrec_text; kept across runs)",
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/serve_bench.json"))
    args = ap.parse_args()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from serving.config import default_threads

    torch.set_num_threads(args.threads or default_threads())  # what the server will use
    extra = ["--max-batch", str(args.max_batch)] + (["--threads", str(args.threads)] if args.threads else [])
    tower = args.model == "sasrec_text"
    if tower:  # the server reads the rows this process embedded (serving/engine.py, Server._text_rows)
        extra += ["--text-cache", str(text_cache_file(args.text_cache))]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
    }
    print(f"model: {args.model}", flush=True)
    rng = random.Random(0)
    for n in args.items:
        with tempfile.TemporaryDirectory(prefix="fedmart-bench-") as tmp:
            registry, pub, catalog_path, model = make_registry(
                Path(tmp), n, model_name=args.model, text_cache=args.text_cache if tower else None
            )
            from serving.scoring import fast_scorer

            fast, path = fast_scorer(model, torch.device("cpu"))
            fwd1 = bare_forward(model, n, batch=1, iters=300)
            fwd16 = bare_forward(model, n, batch=16, iters=100)
            fast1 = bare_forward(model, n, batch=1, iters=300, score=fast)
            fast1_h = bare_forward(model, n, batch=1, iters=300, score=fast, history=args.history)
            print(
                f"items {n:>7,}  forward + top-{args.k}: eager b=1 {fwd1 * 1e3:.2f} ms, b=16 {fwd16 * 1e3:.2f} ms; "
                f"served path ({path}) b=1 {fast1 * 1e3:.2f} ms, b=1 with {args.history} items {fast1_h * 1e3:.2f} ms",
                flush=True,
            )
            ids = [f"SKU-{i:07d}" for i in range(n)]
            port = free_port()
            bodies = [
                request_bytes(
                    {"history": rng.sample(ids, max(1, int(rng.expovariate(1 / args.history)))), "k": args.k}, port
                )
                for _ in range(2000)
            ]
            del model
            proc = start_server(registry, pub, catalog_path, port, extra)
            try:
                for c in args.concurrency:
                    load_before = os.getloadavg()[0]
                    before = server_stats(port)
                    cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
                    r = asyncio.run(load(port, bodies, c, args.duration, args.warmup))
                    cpu1, client1 = cpu_seconds(proc.pid), time.process_time()
                    after = server_stats(port)
                    jobs, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
                    r.update(
                        model=args.model,
                        items=n,
                        bare_forward_ms=fwd1 * 1e3,
                        bare_forward_b16_ms=fwd16 * 1e3,
                        served_forward_ms=fast1 * 1e3,
                        served_forward_h_ms=fast1_h * 1e3,
                        loadavg_1min=(load_before + os.getloadavg()[0]) / 2,
                        mean_batch=jobs / max(batches, 1),
                        # CPU per request (warm-up included in both): robust to other processes' load.
                        server_cpu_ms_per_req=(cpu1 - cpu0) * 1e3 / max(jobs, 1),
                        client_cpu_ms_per_req=(client1 - client0) * 1e3 / max(jobs, 1),
                    )
                    results["runs"].append(r)
                    print(
                        f"items {n:>7,}  c={c:<3} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                        f"p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  mean batch {r['mean_batch']:.1f}  "
                        f"server CPU {r['server_cpu_ms_per_req']:.2f} ms/req  client CPU "
                        f"{r['client_cpu_ms_per_req']:.2f} ms/req  load {r['loadavg_1min']:.1f}",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        "| model | items | concurrency | req/s | p50 ms | p99 ms | errors | mean batch | forward b=1 ms "
        "(eager / served path) | p50 / eager forward | server CPU ms/req | load avg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(
            f"| {r['model']} | {r['items']:,} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | {r['mean_batch']:.1f} | "
            f"{r['bare_forward_ms']:.2f} / {r['served_forward_ms']:.2f} | "
            f"{r['p50_ms'] / r['bare_forward_ms']:.2f}x | {r['server_cpu_ms_per_req']:.2f} | {r['loadavg_1min']:.1f} |"
        )


if __name__ == "__main__":
    main()
