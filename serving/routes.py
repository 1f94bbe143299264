"""The HTTP endpoints, as methods over one :class:`~serving.engine.Server` (registered by ``create_app``).

Request limits the schemas cannot know (``k`` against the catalog size, the department
names) are checked here, before any work; every refusal is an :class:`ErrorResponse`. Each
request takes the served snapshot once (model and catalog together) and resolves, ranks and
answers with it, so a catalog swap in the middle of a request cannot mix two catalogs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import MicroBatcher
from serving.engine import Server
from serving.schemas import (
    ErrorResponse,
    ItemResponse,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    error_response,
    item_payload,
    json_response,
    ranked_payload,
)
from serving.snapshot import FALLBACK_WHAT, Snapshot

__all__ = ["API_KEY_HEADER", "Routes", "add_routes", "key_guard", "jsonable"]

API_KEY_HEADER = "x-api-key"

_API_KEY = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the server has a key")


def key_guard(api_key: str | None) -> list[DependsParam]:
    """Route dependencies: none without a key, else a check of the ``x-api-key`` header (401 if wrong)."""
    if not api_key:
        return []

    async def require_key(key: str | None = Depends(_API_KEY)) -> None:
        if key is None:
            raise StarletteHTTPException(401, f"missing {API_KEY_HEADER} header")
        if not secrets.compare_digest(key.encode(), api_key.encode()):
            raise StarletteHTTPException(401, f"wrong {API_KEY_HEADER}")

    return [Depends(require_key)]


def _unknown_note(unknown: list[str]) -> str | None:
    return f"{len(unknown)} unknown item id(s) ignored" if unknown else None


def jsonable(obj: Any) -> Any:
    """Strict-JSON copy (non-finite floats become strings), for metadata that may hold inf."""
    from privacy.audit import canonical_json

    return json.loads(canonical_json(obj))


class Routes:
    """The endpoints. ``/recommend`` goes through the micro-batcher; ``/search`` runs on the same
    inference thread (``executor``)."""

    def __init__(self, server: Server, batcher: MicroBatcher, executor: ThreadPoolExecutor) -> None:
        self.server = server
        self.batcher = batcher
        self.executor = executor

    @staticmethod
    def _refuse(snap: Snapshot, k: int, department: str | None) -> JSONResponse | None:
        """422 for a ``k`` beyond the catalog or an unknown department; None when both are fine."""
        items = snap.items
        if k > items.num_items:
            return error_response(422, f"k={k} exceeds the catalog's {items.num_items} items")
        if department is not None and department not in items.departments:
            known = ", ".join(sorted(items.departments)[:20])
            return error_response(422, f"unknown department {department!r}; known: {known}")
        return None

    @staticmethod
    def _ranked(
        snap: Snapshot,
        idx: np.ndarray,
        scores: np.ndarray,
        known: np.ndarray,
        unknown: list[str],
        *,
        fallback: str | None = None,
        note: str | None = None,
    ) -> Response:
        """A ranking's response: the model's for the ``known`` part of a history, or the ``fallback``'s."""
        history_used = int(min(len(known), snap.max_len))  # 0 for a fallback
        body = ranked_payload(
            snap.items,
            snap.version,
            idx,
            scores,
            unknown_items=unknown,
            history_used=history_used,
            fallback=fallback,
            note=note,
        )
        return json_response(body)

    async def recommend(self, req: RecommendRequest) -> Response:
        """Top-k next items for a history (oldest first); popularity when the history is empty or unknown."""
        server = self.server
        snap = server.snapshot  # model and catalog for the whole request
        bad = self._refuse(snap, req.k, req.department)
        if bad is not None:
            return bad
        known, unknown = server.resolve(req.history, snap)
        if len(known) == 0:
            _, idx, scores = server.fallback_rank(k=req.k, department=req.department, exclude=None, snap=snap)
            why = "empty history" if not req.history else "no known item in the history"
            note = _unknown_note(unknown)
            note = f"{why}: ranked by {FALLBACK_WHAT[snap.fallback]}" + (f"; {note}" if note else "")
            return self._ranked(snap, idx, scores, known, unknown, fallback=snap.fallback, note=note)
        job = server.job(known, k=req.k, exclude_seen=req.exclude_seen, department=req.department, snap=snap)
        ranked_with, idx, scores = await self.batcher.submit(job)
        return self._ranked(ranked_with, idx, scores, known, unknown, note=_unknown_note(unknown))

    async def search(self, req: SearchRequest) -> Response:
        """Items whose titles match ``query`` (all-MiniLM-L6-v2), blended with the recommender given a history."""
        server = self.server
        snap = server.snapshot
        bad = self._refuse(snap, req.k, req.department)
        if bad is not None:
            return bad
        if server.text_state == "disabled":
            return error_response(501, "search is disabled on this server (started with --no-search)")
        if server.text_state.startswith("unavailable"):
            from federation.text import INSTALL_HINT

            return error_response(501, f"search needs the text extra, which is not installed: {INSTALL_HINT}")
        if server.text_state == "building":
            return error_response(
                503, "the search index is still being built; retry shortly", headers={"Retry-After": "5"}
            )
        if server.text_state != "ready":
            return error_response(501, f"search is unavailable: {server.text_state}")
        if not req.query.strip():
            return error_response(422, "query: must contain a non-space character")
        known, unknown = server.resolve(req.history, snap)
        loop = asyncio.get_running_loop()
        _, idx, scores = await loop.run_in_executor(
            self.executor, lambda: server.search(req.query, known, k=req.k, department=req.department, snap=snap)
        )
        return self._ranked(snap, idx, scores, known, unknown, note=_unknown_note(unknown))

    async def item(self, item_id: str) -> Response:
        """One catalog item by its id."""
        items = self.server.snapshot.items
        i = items.index_of.get(item_id)
        if i is None:
            return error_response(404, f"unknown item id {item_id!r}")
        return json_response(item_payload(items, item_id, i))

    async def model(self) -> dict[str, Any]:
        """The version being served: round, metrics, privacy report, promotion, refusals."""
        server = self.server
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
                "catalog": {**snap.view.describe(), **snap.mapping},
                "model_config": m.get("model_config"),
                "metrics": m.get("metrics"),
                "privacy": m.get("privacy"),
                "promoted_by": snap.promotion.get("by"),
                "promoted_at": snap.promotion.get("at"),
                "promotion_counter": snap.promotion.get("counter"),
                "required": str(server.versions.requirements),
                "loaded_at": snap.loaded_at,
                "device": str(server.device),
                "num_items": snap.catalog.num_items,
                "fallback": snap.fallback,
                "search": server.text_state,
                "refused": dict(server.refused) | {f"catalog {k}": v for k, v in server.catalogs.refused.items()},
                "batching": {"batches": self.batcher.batches, "requests": self.batcher.jobs},
            }
        )

    async def healthz(self) -> dict[str, str]:
        """Liveness: the server runs and has a model."""
        return {"status": "ok", "model_version": self.server.snapshot.version}


def add_routes(app: FastAPI, routes: Routes, guarded: list[DependsParam]) -> None:
    """Register the endpoints on ``app``; ``guarded`` (see :func:`key_guard`) on all but ``/healthz``."""
    app.post("/recommend", response_model=RecommendResponse, dependencies=guarded, tags=["recommend"])(routes.recommend)
    app.post(
        "/search",
        response_model=RecommendResponse,
        dependencies=guarded,
        tags=["search"],
        responses={501: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )(routes.search)
    app.get("/items/{item_id}", response_model=ItemResponse, dependencies=guarded, tags=["catalog"])(routes.item)
    app.get("/model", dependencies=guarded, tags=["model"])(routes.model)
    app.get("/healthz", tags=["model"])(routes.healthz)
