"""The response bodies (serving/schemas.py): one builder for every ranked response, and the error body."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serving.items import ItemIndex
from serving.schemas import (
    ItemResponse,
    RecommendResponse,
    error_response,
    item_payload,
    json_response,
    ranked_payload,
)


@pytest.fixture
def items(tiny_catalog) -> ItemIndex:
    return ItemIndex(tiny_catalog, torch.device("cpu"))


def test_ranked_payload_ranks_items_best_first_with_their_titles_and_departments(items):
    idx, scores = np.array([3, 1]), np.array([2.5, np.float32(0.5)])

    body = ranked_payload(items, "v7", idx, scores, unknown_items=["zz"], history_used=4, note="1 unknown")

    assert list(body) == ["model_version", "items", "fallback", "note", "unknown_items", "history_used"]
    assert body["items"] == [
        {"item_id": "i3", "title": "Green Tea", "department": "Grocery", "score": 2.5, "rank": 1},
        {"item_id": "i1", "title": "Red Kettle", "department": "Kitchen", "score": 0.5, "rank": 2},
    ]
    assert all(type(it["score"]) is float for it in body["items"])
    assert (body["model_version"], body["fallback"], body["note"]) == ("v7", None, "1 unknown")
    assert (body["unknown_items"], body["history_used"]) == (["zz"], 4)
    RecommendResponse.model_validate(body)  # the body is what the OpenAPI schema says


def test_ranked_payload_of_a_fallback_names_it(items):
    body = ranked_payload(
        items, "v1", np.array([2]), np.array([9.0]), unknown_items=[], history_used=0, fallback="popularity", note="n"
    )

    assert body["fallback"] == "popularity" and body["note"] == "n" and body["items"][0]["item_id"] == "i2"


def test_ranked_payload_of_no_items_is_an_empty_list(items):
    body = ranked_payload(items, "v1", np.array([], dtype=np.int64), np.array([]), unknown_items=[], history_used=1)

    assert body["items"] == []


def test_item_payload_is_an_item_response(items):
    body = item_payload(items, "i5", 5)

    assert body == {"item_id": "i5", "title": "Steel Pan", "department": "Kitchen", "merchant": "m1", "price": 20.0}
    ItemResponse.model_validate(body)


def test_error_response_carries_status_message_detail_and_headers():
    r = error_response(503, "not yet", detail=[1], headers={"Retry-After": "5"})

    assert r.status_code == 503
    assert json.loads(r.body) == {"error": "not yet", "detail": [1]}
    assert r.headers["retry-after"] == "5"


def test_json_response_is_compact_json():
    r = json_response({"a": [1, 2], "b": None})

    assert r.body == b'{"a":[1,2],"b":null}'
    assert r.media_type == "application/json"
