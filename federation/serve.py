"""``fedmart serve``: recommendations and search over HTTP from the newest promoted, verified model.

One process holds one :class:`Snapshot` (a verified model version, ready on its
device) and swaps it for a new one by a single reference assignment: a request
takes the snapshot when its batch runs and keeps it to the end, so a swap never
drops or mixes an in-flight request. A poller watches ``promotions.jsonl``; a newly
promoted version is verified, loaded and warmed up off the request path, then
swapped in. A tampered, unsigned or mismatching version is refused with a log
line and the previous version keeps serving.

Concurrent ``/recommend`` requests are micro-batched: one inference thread runs
whatever has queued while the previous batch was computing (no added wait at low
load; batches grow with load). The catalog is fixed for the life of the process:
a version trained on another catalog is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from federation.catalog import Catalog
from federation.device import select_device
from federation.globalmodel import set_weights
from federation.model import SASRec, SASRecConfig
from federation.registry import ModelRegistry, RegistryError
from privacy.signing import load_public_key

__all__ = [
    "ServeConfig",
    "ServeError",
    "Server",
    "create_app",
    "run_server",
    "serve_in_thread",
    "default_threads",
    "fast_scorer",
    "MAX_K",
    "MAX_HISTORY",
]

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_BODY_BYTES = 1 << 20
MAX_QUERY_CHARS = 512
API_KEY_HEADER = "x-api-key"


_FALLBACK_WHAT = {
    "popularity": "item popularity published with this version",
    "model_prior": "the model's item prior (output bias; no popularity was published with this version)",
    "catalog_order": "catalog order (no popularity was published with this version)",
}


_API_KEY = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the server has a key")


class ServeError(RuntimeError):
    """The server cannot start (no verified promoted version, catalog mismatch, bad key file)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``fedmart serve`` needs; keys and secrets are paths or env, never config values."""

    registry: Path
    public_key: Path
    catalog: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    reload_interval: float = 10.0
    device: str = "auto"
    max_batch: int = 64
    threads: int | None = None  # torch intra-op threads; None: default_threads()
    search: bool = True  # build the title index for /search (in the background)
    text_cache: Path | None = None  # .npy cache of title embeddings (default: beside the catalog's cache dir)
    search_blend: float = 0.3  # weight of the recommender in /search when a history is given

    def __post_init__(self) -> None:
        if self.reload_interval <= 0:
            raise ValueError("reload_interval must be > 0 seconds")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0.0 <= self.search_blend <= 1.0:
            raise ValueError("search_blend must be in [0, 1]")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key must be at least 8 characters")


# --- request and response schemas -------------------------------------------------------------

ItemId = Annotated[str, Field(min_length=1, max_length=256)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    history: list[ItemId] = Field(
        default_factory=list, max_length=MAX_HISTORY, description="the user's item ids, oldest first"
    )
    k: int = Field(10, ge=1, le=MAX_K, description="how many items to return")
    exclude_seen: bool = Field(True, description="leave out items already in the history")
    department: str | None = Field(None, max_length=256, description="only items of this department")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS, description="free text")
    history: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K)
    department: str | None = Field(None, max_length=256)


class ScoredItem(BaseModel):
    item_id: str
    title: str
    department: str
    score: float
    rank: int


class RecommendResponse(BaseModel):
    model_version: str
    items: list[ScoredItem]
    fallback: str | None = Field(None, description="popularity | model_prior | catalog_order when not personalised")
    note: str | None = None
    unknown_items: list[str] = Field(default_factory=list, description="history ids not in the catalog (ignored)")
    history_used: int = 0


class ItemResponse(BaseModel):
    item_id: str
    title: str
    department: str
    merchant: str
    price: float


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


# --- the model snapshot ------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A verified model version, on its device, with its cold-start ranking. Never mutated."""

    version: str
    metadata: dict[str, Any]
    model: SASRec
    max_len: int
    fallback: str  # popularity | model_prior | catalog_order
    fallback_scores: np.ndarray  # (n + 1,) float64, index 0 unused
    fallback_order: np.ndarray  # (n,) 1-based item indices, best first
    promotion: dict[str, Any]
    infer: Callable[[torch.Tensor], torch.Tensor]  # (b, max_len) left-padded -> (b, n + 1) scores
    inference: str  # "traced, trimmed" or "eager": which path infer takes
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


@dataclass
class _Job:
    seq: np.ndarray  # (max_len,) int64, left-padded
    exclude: np.ndarray | None  # 1-based indices to drop
    department: str | None
    k: int


def default_threads() -> int:
    """Torch threads for inference: all cores but one, which the event loop (HTTP, JSON) needs.

    On a small CPU, intra-op threads that compete with the event loop cost far more
    than they give: measured on 2 cores, a batch-1 forward took 3x longer with 2
    threads than with 1 while the server was under load.
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def _sasrec_config(model_config: dict[str, Any], catalog: Catalog) -> SASRecConfig:
    """The metadata's ``model_config`` is ``SASRecConfig.to_dict()``; a Hydra model group plus
    ``max_len`` is accepted too."""
    known = set(SASRecConfig.__dataclass_fields__)
    if "num_items" in model_config:
        return SASRecConfig(**{k: v for k, v in model_config.items() if k in known})
    from federation.globalmodel import model_config as from_hydra

    return from_hydra(catalog, model_config, int(model_config.get("max_len", 50)))


class Server:
    """The serving core, usable without HTTP: loading, swapping, ranking."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        torch.set_num_threads(int(config.threads or default_threads()))
        self.device = select_device(config.device)
        try:
            self.public_key = load_public_key(config.public_key)
        except ValueError as exc:
            raise ServeError(str(exc)) from exc
        if not Path(config.registry).is_dir():
            raise ServeError(f"{config.registry}: no model registry there")
        self.registry = ModelRegistry(Path(config.registry), public_key_path=Path(config.public_key))
        self.catalog = Catalog.load(config.catalog)
        n = self.catalog.num_items
        self.index_of: dict[str, int] = {iid: i + 1 for i, iid in enumerate(self.catalog.item_id.tolist())}
        self.titles: list[str] = self.catalog.title.tolist()
        self.item_ids: list[str] = self.catalog.item_id.tolist()
        self.item_departments: list[str] = self.catalog.department.tolist()
        self.departments: dict[str, np.ndarray] = {}  # name -> (n + 1,) bool, index 0 False
        for d in np.unique(self.catalog.department).tolist():
            mask = np.zeros(n + 1, dtype=bool)
            mask[1:] = self.catalog.department == d
            self.departments[d] = mask
        self._dept_masks_t: dict[str, torch.Tensor] = {
            d: torch.from_numpy(~m).to(self.device) for d, m in self.departments.items()
        }
        self.refused: dict[str, str] = {}  # version -> reason, for /model
        self._promotions_stamp: tuple | None = None
        self._swap_lock = threading.Lock()
        self.text_state = "disabled"
        self._title_emb: torch.Tensor | None = None  # (n + 1, 384) on device, row 0 zero
        self._encoder = None
        self._text_model_emb: torch.Tensor | None = None
        version = self._select()
        if version is None:
            raise ServeError(
                f"{config.registry}: no promoted version verifies with {config.public_key}; "
                "promote one with `fedmart registry promote VERSION`"
            )
        self.snapshot: Snapshot = self._load(version)
        log.info(
            "serving %s (run %s, round %s) on %s; %d items",
            version,
            self.snapshot.metadata.get("run"),
            self.snapshot.metadata.get("round"),
            self.device,
            n,
        )

    # -- versions ------------------------------------------------------------------------------
    def _stamp(self) -> tuple | None:
        try:
            st = (Path(self.config.registry) / "promotions.jsonl").stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _select(self) -> str | None:
        """Newest promoted version that verifies; logs each refusal."""
        self._promotions_stamp = self._stamp()
        records = self.registry.promoted()
        seen: set[str] = set()
        for rec in reversed(records):
            v = rec["version"]
            if v in seen:
                continue
            seen.add(v)
            ok, reason = self.registry.verify(v, self.public_key)
            if ok:
                return v
            if self.refused.get(v) != reason:
                current = getattr(self, "snapshot", None)
                log.error(
                    "refusing promoted version %s: %s; %s",
                    v,
                    reason,
                    f"still serving {current.version}" if current else "trying an older promotion",
                )
            self.refused[v] = reason
        return None

    def _load(self, version: str) -> Snapshot:
        """Verify, load, warm up; raises RegistryError/ServeError on anything wrong."""
        weights, meta = self.registry.load(version, self.public_key)
        if meta.get("catalog_version") != self.catalog.version:
            raise ServeError(
                f"{version} was trained on catalog {meta.get('catalog_version')}, "
                f"but --catalog is {self.catalog.version}: serve it with its own catalog"
            )
        cfg = _sasrec_config(dict(meta.get("model_config") or {}), self.catalog)
        if cfg.num_items != self.catalog.num_items:
            raise ServeError(f"{version}: model has {cfg.num_items} items, the catalog {self.catalog.num_items}")
        text = self._text_for_model() if cfg.text_dim else None
        model = SASRec(cfg, text_embeddings=text)
        try:
            set_weights(model, weights)
        except ValueError as exc:
            raise ServeError(f"{version}: {exc}") from exc
        model = model.to(self.device).eval()
        infer, inference = fast_scorer(model, self.device)
        kind, scores = self._fallback(version, weights)
        order = np.argsort(-scores[1:], kind="stable") + 1
        promotion = next((r for r in reversed(self.registry.promoted()) if r["version"] == version), {})
        log.info("%s: inference path %s on %s", version, inference, self.device)
        return Snapshot(version, meta, model, cfg.max_len, kind, scores, order, promotion, infer, inference)

    def _fallback(self, version: str, weights: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
        n = self.catalog.num_items
        pop = self.registry.load_popularity(version, self.public_key)
        if pop is not None:
            pop = np.asarray(pop, dtype=np.float64)
            if len(pop) == n:
                pop = np.concatenate([[0.0], pop])
            if len(pop) == n + 1:
                return "popularity", pop
            log.warning("%s: popularity has %d entries, the catalog %d items; ignored", version, len(pop), n)
        bias = weights.get("head.bias")
        if bias is not None and len(bias) == n + 1:
            # The output bias of a softmax model tracks log item frequency: a popularity prior that is
            # pure post-processing of the (DP-trained) weights.
            return "model_prior", np.asarray(bias, dtype=np.float64)
        return "catalog_order", -np.arange(n + 1, dtype=np.float64)

    def maybe_reload(self, force: bool = False) -> str | None:
        """Swap in a newly promoted verified version; returns it, or None if nothing changed."""
        with self._swap_lock:
            stamp = self._stamp()
            if not force and stamp == self._promotions_stamp:
                return None
            version = self._select()
            if version is None or version == self.snapshot.version:
                return None
            try:
                snap = self._load(version)
            except (RegistryError, ServeError, ValueError) as exc:
                self.refused[version] = str(exc)
                log.error("refusing promoted version %s: %s; still serving %s", version, exc, self.snapshot.version)
                return None
            self.refused.pop(version, None)
            old, self.snapshot = self.snapshot, snap  # the swap: one reference assignment
            log.info("now serving %s (was %s)", version, old.version)
            return version

    # -- ranking -------------------------------------------------------------------------------
    def resolve(self, history: list[str]) -> tuple[np.ndarray, list[str]]:
        """Known 1-based indices (in order) and the unknown ids (first occurrence, in order)."""
        idx, unknown = [], []
        get = self.index_of.get
        for iid in history:
            i = get(iid)
            if i is None:
                if iid not in unknown:
                    unknown.append(iid)
            else:
                idx.append(i)
        return np.asarray(idx, dtype=np.int64), unknown

    def job(self, known: np.ndarray, *, k: int, exclude_seen: bool, department: str | None) -> _Job:
        max_len = self.snapshot.max_len
        seq = np.zeros(max_len, dtype=np.int64)
        tail = known[-max_len:]
        seq[max_len - len(tail) :] = tail
        return _Job(seq, known if exclude_seen else None, department, k)  # duplicates are harmless

    def run_batch(self, jobs: list[_Job]) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
        """One forward for all ``jobs`` -> (version, [(indices, scores)] best first)."""
        snap = self.snapshot  # held for the whole batch: a swap now does not touch this batch
        max_len = snap.max_len
        seqs = np.stack([_fit(j.seq, max_len) for j in jobs])  # (b, t)
        with torch.inference_mode():
            scores = snap.infer(torch.from_numpy(seqs).to(self.device))  # (b, n + 1)
            for i, j in enumerate(jobs):
                if j.exclude is not None and len(j.exclude):
                    scores[i, torch.from_numpy(j.exclude).to(self.device)] = -math.inf
                if j.department is not None:
                    scores[i].masked_fill_(self._dept_masks_t[j.department], -math.inf)
            kmax = min(max(j.k for j in jobs), scores.shape[1] - 1)
            top = torch.topk(scores, kmax, dim=1)
            vals, idx = top.values.cpu().numpy(), top.indices.cpu().numpy()
        out = []
        for i, j in enumerate(jobs):
            v, ix = vals[i, : j.k], idx[i, : j.k]
            keep = np.isfinite(v)
            out.append((ix[keep], v[keep]))
        return snap.version, out

    def fallback_rank(self, *, k: int, department: str | None, exclude: np.ndarray | None) -> tuple:
        snap = self.snapshot
        order = snap.fallback_order
        if department is not None:
            order = order[self.departments[department][order]]
        if exclude is not None and len(exclude):
            order = order[~np.isin(order, exclude)]
        top = order[:k]
        return snap, top, snap.fallback_scores[top]

    # -- search --------------------------------------------------------------------------------
    def _text_for_model(self) -> torch.Tensor:
        if self._text_model_emb is None:
            from federation.text import title_embeddings

            self._text_model_emb = title_embeddings(self.catalog.title, cache=self._text_cache_path())
        return self._text_model_emb

    def _text_cache_path(self) -> Path:
        if self.config.text_cache is not None:
            return Path(self.config.text_cache)
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedmart"
        return base / f"title-emb-{self.catalog.version}.npy"

    def text_available(self) -> bool:
        """Is the text extra installed? Cheap (no model load); sets ``text_state`` when it is not."""
        from federation.text import TextExtraMissing, model_dir

        try:
            model_dir()
        except TextExtraMissing as exc:
            self.text_state = f"unavailable: {exc}"
            log.warning("/search disabled: %s", exc)
            return False
        return True

    def build_text_index(self) -> None:
        """Load the title encoder and the catalog's title embeddings (slow: run off the request path)."""
        from federation.text import TextExtraMissing, TitleEncoder, title_embeddings

        self.text_state = "building"
        try:
            encoder = TitleEncoder(device=self.device)
            emb = self._text_model_emb
            if emb is None:
                emb = title_embeddings(self.catalog.title, cache=self._text_cache_path())
            self._title_emb = emb.to(self.device)
            self._encoder = encoder
            self.text_state = "ready"
            log.info("search index ready: %d titles", self.catalog.num_items)
        except TextExtraMissing as exc:
            self.text_state = f"unavailable: {exc}"
            log.warning("/search disabled: %s", exc)
        except Exception as exc:  # a broken encoder must not take the recommender down
            self.text_state = f"failed: {exc}"
            log.exception("building the search index failed; /search is disabled")

    def search(
        self, query: str, known: np.ndarray, *, k: int, department: str | None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """Rank items by title similarity to ``query``, blended with the recommender given a history."""
        assert self._encoder is not None and self._title_emb is not None
        snap = self.snapshot
        q = torch.from_numpy(self._encoder.encode([query])[0]).to(self.device)  # (384,)
        with torch.inference_mode():
            score = _zscore(self._title_emb[1:] @ q)  # (n,)
            if len(known):
                seq = self.job(known, k=k, exclude_seen=False, department=None).seq
                rec = snap.infer(torch.from_numpy(_fit(seq, snap.max_len))[None].to(self.device))[0, 1:]
                w = self.config.search_blend
                score = (1 - w) * score + w * _zscore(rec)
            if department is not None:
                score = score.masked_fill(self._dept_masks_t[department][1:], -math.inf)
            top = torch.topk(score, min(k, score.shape[0]))
            vals, idx = top.values.cpu().numpy(), top.indices.cpu().numpy() + 1
        keep = np.isfinite(vals)
        return snap.version, idx[keep], vals[keep]


class _LastScores(torch.nn.Module):
    """``SASRec.score_last`` with explicit position ids, so a batch's all-padding left columns can be cut.

    Cutting them is exact: pads neither attend nor are attended, and each real item
    keeps the position id it had in the full-length (training) layout.
    """

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.item_emb(seq)  # (b, t, d)
        if m.config.text_dim:
            x = x + m.text_proj(m.text_emb[seq])
        h = m.encoder(
            inputs_embeds=x, attention_mask=(seq > 0).long(), position_ids=pos, token_type_ids=torch.zeros_like(seq)
        ).last_hidden_state[:, -1]  # (b, d)
        return m.head(h)  # (b, n + 1)


def fast_scorer(model: SASRec, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A faster ``model.score_last``: TorchScript-traced, with the batch's leading padding cut.

    For a model this small the Python overhead of the HF layers costs more than the
    arithmetic; tracing removes it (about 3x on a 2-core CPU). The traced scorer is
    checked against ``score_last`` on random batches of several sizes and history
    lengths; on any mismatch (or if tracing fails) the eager ``score_last`` is used.
    """
    L = model.config.max_len
    n = model.config.num_items
    gen = torch.Generator().manual_seed(0)

    def sample(b: int, lengths: list[int]) -> torch.Tensor:
        seq = torch.zeros(b, L, dtype=torch.long)
        for i, k in enumerate(lengths):
            seq[i, L - k :] = torch.randint(1, n + 1, (k,), generator=gen)
        return seq.to(device)

    eager = model.score_last
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes about Python values; checked below
            example = sample(3, [L, L // 2, 1])
            traced = torch.jit.trace(_LastScores(model).eval(), (example, _positions(example, 0)), check_trace=False)

            def infer(seq: torch.Tensor) -> torch.Tensor:
                start = int((seq != 0).any(0).to(torch.int8).argmax())  # first column holding any item
                seq = seq[:, start:]
                scores = traced(seq, _positions(seq, start))
                scores[:, 0] = -math.inf
                return scores

            for b, lengths in [(1, [L]), (1, [1]), (1, [max(1, L // 3)]), (4, [1, 2, L, L - 1]), (16, [L] * 16)]:
                x = sample(b, lengths)
                want, got = eager(x)[:, 1:], infer(x)[:, 1:]
                if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"traced scores differ by {(want - got).abs().max().item():.2e}")
            for b in (1, 16):  # warm-up: first calls allocate and pick kernels
                infer(sample(b, [L] * b))
        return infer, "traced, trimmed"
    except Exception as exc:  # tracing is an optimisation: never a reason not to serve
        log.warning("fast inference path unavailable (%s); using the eager model", str(exc).splitlines()[0][:200])
        with torch.inference_mode():
            eager(sample(1, [L]))
        return eager, "eager"


def _positions(seq: torch.Tensor, start: int) -> torch.Tensor:
    b, t = seq.shape
    return torch.arange(start, start + t, device=seq.device).repeat(b, 1)  # (b, t)


def _fit(seq: np.ndarray, max_len: int) -> np.ndarray:
    """Left-pad or cut ``seq`` to ``max_len`` (a swapped-in model may have another max_len)."""
    if len(seq) == max_len:
        return seq
    out = np.zeros(max_len, dtype=np.int64)
    tail = seq[-max_len:]
    out[max_len - len(tail) :] = tail
    return out


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp(min=1e-6)


# --- micro-batching ------------------------------------------------------------------------


class MicroBatcher:
    """Runs queued jobs in batches on one inference thread.

    A request never waits for company: the worker takes whatever is queued the
    moment the previous batch finishes, so batches form only under load.
    """

    def __init__(self, run: Callable[[list[_Job]], tuple[str, list]], executor: ThreadPoolExecutor, max_batch: int):
        self._run = run
        self._executor = executor
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, job: _Job) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        assert self._queue is not None, "MicroBatcher.start() first"
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, fut))
        return await fut

    async def _worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(j, f) for j, f in batch if not f.done()]  # client went away
            if not batch:
                continue
            try:
                version, results = await loop.run_in_executor(self._executor, self._run, [j for j, _ in batch])
            except Exception as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.jobs += len(batch)
            for (_, f), r in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result((version, r))


# --- HTTP ------------------------------------------------------------------------------------


def _error(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), media_type="application/json")


class _BodyLimit:
    """Pure ASGI middleware: 413 for bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = e.get("ctx") or {}
        return 400, f"malformed JSON body: {ctx.get('error', e.get('msg', 'invalid'))}"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def create_app(config: ServeConfig, *, server: Server | None = None) -> FastAPI:
    """The FastAPI app. Loads the model now (raising :class:`ServeError`), starts workers on startup."""
    server = server or Server(config)
    executor = ThreadPoolExecutor(1, thread_name_prefix="fedmart-infer")
    batcher = MicroBatcher(server.run_batch, executor, config.max_batch)

    async def poll() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(config.reload_interval)
            try:
                await loop.run_in_executor(None, server.maybe_reload)
            except Exception:
                log.exception("checking for a newly promoted version failed; still serving %s", server.snapshot.version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        tasks = [asyncio.get_running_loop().create_task(poll())]
        if config.search and server.text_available():
            server.text_state = "building"
            tasks.append(asyncio.get_running_loop().run_in_executor(None, server.build_text_index))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await batcher.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="fedmart",
        summary="Recommendations and search from a federated, differentially private model.",
        version="1",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    app.state.server = server
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, msg = _validation_message(exc)
        detail = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        return _error(status, msg, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no such endpoint: {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return _error(exc.status_code, msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; see the server log")

    async def require_key(key: str | None = Depends(_API_KEY)) -> None:
        if config.api_key is None:
            return
        if key is None:
            raise StarletteHTTPException(401, f"missing {API_KEY_HEADER} header")
        if not secrets.compare_digest(key.encode(), config.api_key.encode()):
            raise StarletteHTTPException(401, f"wrong {API_KEY_HEADER}")

    guarded = [Depends(require_key)] if config.api_key else []

    def check_department(department: str | None) -> JSONResponse | None:
        if department is not None and department not in server.departments:
            known = ", ".join(sorted(server.departments)[:20])
            return _error(422, f"unknown department {department!r}; known: {known}")
        return None

    def check_k(k: int) -> JSONResponse | None:
        if k > server.catalog.num_items:
            return _error(422, f"k={k} exceeds the catalog's {server.catalog.num_items} items")
        return None

    def items_payload(idx: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        ids, titles, depts = server.item_ids, server.titles, server.item_departments
        return [
            {"item_id": ids[i - 1], "title": titles[i - 1], "department": depts[i - 1], "score": float(s), "rank": r}
            for r, (i, s) in enumerate(zip(idx.tolist(), scores.tolist(), strict=True), start=1)
        ]

    @app.post("/recommend", response_model=RecommendResponse, dependencies=guarded, tags=["recommend"])
    async def recommend(req: RecommendRequest) -> Response:
        """Top-k next items for a history (oldest first); popularity when the history is empty or unknown."""
        bad = check_k(req.k) or check_department(req.department)
        if bad is not None:
            return bad
        known, unknown = server.resolve(req.history)
        note = f"{len(unknown)} unknown item id(s) ignored" if unknown else None
        if len(known) == 0:
            snap, idx, scores = server.fallback_rank(k=req.k, department=req.department, exclude=None)
            why = "empty history" if not req.history else "no known item in the history"
            return _json(
                {
                    "model_version": snap.version,
                    "items": items_payload(idx, scores),
                    "fallback": snap.fallback,
                    "note": f"{why}: ranked by {_FALLBACK_WHAT[snap.fallback]}" + (f"; {note}" if note else ""),
                    "unknown_items": unknown,
                    "history_used": 0,
                }
            )
        job = server.job(known, k=req.k, exclude_seen=req.exclude_seen, department=req.department)
        version, (idx, scores) = await batcher.submit(job)
        return _json(
            {
                "model_version": version,
                "items": items_payload(idx, scores),
                "fallback": None,
                "note": note,
                "unknown_items": unknown,
                "history_used": int(min(len(known), server.snapshot.max_len)),
            }
        )

    @app.post(
        "/search",
        response_model=RecommendResponse,
        dependencies=guarded,
        tags=["search"],
        responses={501: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def search(req: SearchRequest) -> Response:
        """Items whose titles match ``query`` (all-MiniLM-L6-v2), blended with the recommender given a history."""
        bad = check_k(req.k) or check_department(req.department)
        if bad is not None:
            return bad
        if server.text_state == "disabled":
            return _error(501, "search is disabled on this server (started with --no-search)")
        if server.text_state.startswith("unavailable"):
            from federation.text import INSTALL_HINT

            return _error(501, f"search needs the text extra, which is not installed: {INSTALL_HINT}")
        if server.text_state == "building":
            return _error(503, "the search index is still being built; retry shortly", headers={"Retry-After": "5"})
        if server.text_state != "ready":
            return _error(501, f"search is unavailable: {server.text_state}")
        if not req.query.strip():
            return _error(422, "query: must contain a non-space character")
        known, unknown = server.resolve(req.history)
        loop = asyncio.get_running_loop()
        version, idx, scores = await loop.run_in_executor(
            executor, lambda: server.search(req.query, known, k=req.k, department=req.department)
        )
        note = f"{len(unknown)} unknown item id(s) ignored" if unknown else None
        return _json(
            {
                "model_version": version,
                "items": items_payload(idx, scores),
                "fallback": None,
                "note": note,
                "unknown_items": unknown,
                "history_used": int(min(len(known), server.snapshot.max_len)),
            }
        )

    @app.get("/items/{item_id}", response_model=ItemResponse, dependencies=guarded, tags=["catalog"])
    async def item(item_id: str) -> Response:
        """One catalog item by its id."""
        i = server.index_of.get(item_id)
        if i is None:
            return _error(404, f"unknown item id {item_id!r}")
        c = server.catalog
        return _json(
            {
                "item_id": item_id,
                "title": server.titles[i - 1],
                "department": server.item_departments[i - 1],
                "merchant": str(c.merchant[i - 1]),
                "price": float(c.price[i - 1]),
            }
        )

    @app.get("/model", dependencies=guarded, tags=["model"])
    async def model() -> dict[str, Any]:
        """The version being served: round, metrics, privacy report, promotion, refusals."""
        snap = server.snapshot
        m = snap.metadata
        return jsonable(
            {
                "version": snap.version,
                "run": m.get("run"),
                "round": m.get("round"),
                "created_at": m.get("created_at"),
                "parent": m.get("parent"),
                "catalog_version": m.get("catalog_version"),
                "model_config": m.get("model_config"),
                "metrics": m.get("metrics"),
                "privacy": m.get("privacy"),
                "promoted_by": snap.promotion.get("by"),
                "promoted_at": snap.promotion.get("at"),
                "loaded_at": snap.loaded_at,
                "device": str(server.device),
                "num_items": server.catalog.num_items,
                "fallback": snap.fallback,
                "search": server.text_state,
                "refused": dict(server.refused),
                "batching": {"batches": batcher.batches, "requests": batcher.jobs},
            }
        )

    @app.get("/healthz", tags=["model"])
    async def healthz() -> dict[str, str]:
        """Liveness: the server runs and has a model."""
        return {"status": "ok", "model_version": server.snapshot.version}

    return app


def jsonable(obj: Any) -> Any:
    """Strict-JSON copy (non-finite floats become strings), for metadata that may hold inf."""
    from privacy.audit import canonical_json

    return json.loads(canonical_json(obj))


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread (tests, notebooks); yields the base URL.

    ``port=0`` binds a free port; the socket is bound before uvicorn starts, so there is no race.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedmart-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise ServeError("the server did not start; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def run_server(config: ServeConfig, *, log_level: str = "info") -> None:
    """Load the model and serve until interrupted (uvicorn, one process)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False, proxy_headers=False)
