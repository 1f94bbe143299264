"""The HTTP API's bodies: requests and their limits, responses, and the builders of the bodies sent.

Responses on the hot path are built as plain dicts and serialised once (no pydantic
round trip); the models here still define them in the OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from serving.items import ItemIndex

__all__ = [
    "MAX_K",
    "MAX_HISTORY",
    "MAX_QUERY_CHARS",
    "ItemId",
    "RecommendRequest",
    "SearchRequest",
    "ScoredItem",
    "RecommendResponse",
    "ItemResponse",
    "ErrorResponse",
    "ranked_payload",
    "item_payload",
    "error_response",
    "json_response",
]

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_QUERY_CHARS = 512

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


def ranked_payload(
    items: ItemIndex,
    version: str,
    idx: np.ndarray,
    scores: np.ndarray,
    *,
    unknown_items: list[str],
    history_used: int,
    fallback: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """A :class:`RecommendResponse` body (``/recommend`` and ``/search``) for 1-based ``idx``, best first."""
    ids, titles, depts = items.item_ids, items.titles, items.item_departments
    return {
        "model_version": version,
        "items": [
            {"item_id": ids[i - 1], "title": titles[i - 1], "department": depts[i - 1], "score": float(s), "rank": r}
            for r, (i, s) in enumerate(zip(idx.tolist(), scores.tolist(), strict=True), start=1)
        ],
        "fallback": fallback,
        "note": note,
        "unknown_items": unknown_items,
        "history_used": history_used,
    }


def item_payload(items: ItemIndex, item_id: str, i: int) -> dict[str, Any]:
    """An :class:`ItemResponse` body for the item at 1-based index ``i``."""
    c = items.catalog
    return {
        "item_id": item_id,
        "title": items.titles[i - 1],
        "department": items.item_departments[i - 1],
        "merchant": str(c.merchant[i - 1]),
        "price": float(c.price[i - 1]),
    }


def error_response(
    status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An :class:`ErrorResponse`: every 4xx and 5xx the API sends."""
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def json_response(obj: Any) -> Response:
    """Compact JSON without a pydantic round trip."""
    return Response(json.dumps(obj, separators=(",", ":")).encode(), media_type="application/json")
