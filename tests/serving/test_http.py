"""``fedmart serve`` over HTTP (serving/http.py, serving/routes.py): the API's answers, its errors, auth, search."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.http import create_app
from serving.schemas import MAX_K

# starlette.testclient still runs on httpx (as FastAPI documents); its nudge towards httpx2 is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def test_recommend_returns_k_scored_titled_items_and_the_version(world, client):
    history = world.ids([3, 10, 42])

    r = client.post("/recommend", json={"history": history, "k": 7})

    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == world.versions[-1]
    assert body["fallback"] is None and body["history_used"] == 3
    items = body["items"]
    assert [it["rank"] for it in items] == list(range(1, 8))
    assert all(it["title"] and it["department"] for it in items)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    assert not set(history) & {it["item_id"] for it in items}  # exclude_seen defaults to true


def test_recommend_matches_the_model_directly(world, client):
    """The server's ranking is the model's ranking (same weights, same padding)."""
    history = list(range(1, 15))
    server = client.app.state.server
    seq = np.zeros(server.snapshot.max_len, dtype=np.int64)
    seq[:] = history[-server.snapshot.max_len :]
    import torch

    scores = server.snapshot.model.score_last(torch.from_numpy(seq)[None])[0]
    expected = torch.topk(scores, 5).indices.tolist()

    r = client.post("/recommend", json={"history": world.ids([h - 1 for h in history]), "k": 5, "exclude_seen": False})

    assert [it["item_id"] for it in r.json()["items"]] == world.ids([i - 1 for i in expected])


def test_department_filter(world, client):
    dept = str(world.catalog.department[0])

    r = client.post("/recommend", json={"history": world.ids([1, 2]), "k": 20, "department": dept})

    assert r.status_code == 200
    assert {it["department"] for it in r.json()["items"]} == {dept}


def test_unknown_ids_are_named_and_ignored_when_others_remain(world, client):
    history = [*world.ids([5, 6]), "no-such-item", 12345]

    body = client.post("/recommend", json={"history": history, "k": 3}).json()

    assert body["unknown_items"] == ["no-such-item", "12345"]
    assert body["fallback"] is None and body["history_used"] == 2
    assert "2 unknown" in body["note"]


@pytest.mark.parametrize("history", [[], ["nope", "nada"]])
def test_empty_or_fully_unknown_history_falls_back_to_popularity(world, client, history):
    body = client.post("/recommend", json={"history": history, "k": 5}).json()

    assert body["fallback"] == "popularity"
    assert "popularity" in body["note"]
    expected = np.argsort(-world.popularity[1:], kind="stable")[:5]
    assert [it["item_id"] for it in body["items"]] == world.ids(expected)


def test_without_published_popularity_the_model_prior_is_used_and_said(tmp_path, support):
    world = support.make_world(tmp_path, num_items=60, promote=False)
    weights, cfg = support.random_weights(world.catalog, 3)
    v = world.registry.publish(
        weights,
        run="r",
        round=2,
        config_hash="c",
        catalog_version=world.catalog.version,
        model_config=cfg,
        metrics={},
        privacy={},
        parent=None,
    )
    world.registry.promote(v, by="t")
    with TestClient(create_app(world.serve_config())) as c:
        body = c.post("/recommend", json={"history": [], "k": 3}).json()

    assert body["fallback"] == "model_prior"
    assert "no popularity was published" in body["note"]


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        ({"history": [], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"history": [], "k": MAX_K + 1}, 422, "k: Input should be less than or equal to"),
        ({"history": [], "k": 301}, 422, "exceeds the catalog's 300 items"),
        ({"history": [], "k": "ten"}, 422, "k: Input should be a valid integer"),
        ({"history": "i1"}, 422, "history: Input should be a valid list"),
        ({"history": [None]}, 422, "history.0"),
        ({"history": [""]}, 422, "history.0: String should have at least 1 character"),
        ({"history": [], "department": "Nowhere"}, 422, "unknown department 'Nowhere'"),
        ({"history": [], "kk": 3}, 422, "kk: Extra inputs are not permitted"),
        ([1, 2, 3], 422, "body: Input should be a valid dictionary"),
    ],
)
def test_invalid_requests_are_4xx_with_a_reason(client, payload, status, reason):
    r = client.post("/recommend", json=payload)

    assert r.status_code == status
    assert reason in r.json()["error"]


@pytest.mark.parametrize("raw", [b"{", b'{"history": [}', b"\xff\xfe", b'{"k": 3} trailing', b""])
def test_malformed_json_is_400(client, raw):
    r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})

    assert r.status_code in (400, 422)
    assert r.json()["error"]


def test_deeply_nested_json_is_a_4xx_not_a_crash(client):
    raw = b'{"history": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})

    assert 400 <= r.status_code < 500


def test_oversized_body_is_413(client):
    r = client.post("/recommend", json={"history": ["x" * 200] * 6000})

    assert r.status_code == 413
    assert "over" in r.json()["error"]


def test_many_invalid_fields_are_named_five_at_a_time(client):
    r = client.post("/recommend", json={f"x{i}": 1 for i in range(7)})

    assert r.status_code == 422
    assert r.json()["error"].count("Extra inputs are not permitted") == 5
    assert r.json()["error"].endswith("(+2 more)") and len(r.json()["detail"]) == 7


def test_unknown_paths_and_methods_say_so(client):
    assert client.get("/nope").status_code == 404
    assert "no such endpoint" in client.get("/nope").json()["error"]
    r = client.get("/recommend")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]


def test_items_model_healthz_and_docs(world, client):
    iid = str(world.catalog.item_id[7])

    item = client.get(f"/items/{iid}").json()
    assert item == {
        "item_id": iid,
        "title": str(world.catalog.title[7]),
        "department": str(world.catalog.department[7]),
        "merchant": str(world.catalog.merchant[7]),
        "price": float(world.catalog.price[7]),
    }
    missing = client.get("/items/none-such")
    assert missing.status_code == 404 and "none-such" in missing.json()["error"]
    model = client.get("/model").json()
    assert model["version"] == world.versions[-1]
    assert model["round"] == 1 and model["privacy"]["epsilon"] == 2.0 and model["promoted_by"] == "pytest"
    assert client.get("/healthz").json() == {"status": "ok", "model_version": world.versions[-1]}
    assert "/recommend" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_api_key_is_required_when_configured(world):
    with TestClient(create_app(world.serve_config(api_key="s3cret-key"))) as c:
        assert c.post("/recommend", json={"history": []}).status_code == 401
        assert c.post("/recommend", json={"history": []}, headers={"x-api-key": "wrong-key"}).status_code == 401
        ok = c.post("/recommend", json={"history": []}, headers={"x-api-key": "s3cret-key"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open


def test_search_without_the_text_extra_is_501_with_the_install_hint(world, monkeypatch):
    import federation.text as text

    def missing():
        raise text.TextExtraMissing(f"the title encoder is not installed; {text.INSTALL_HINT}")

    monkeypatch.setattr(text, "model_dir", missing)
    with TestClient(create_app(world.serve_config(search=True, text_cache=None))) as c:
        assert c.app.state.server.text_state != "ready"
        r = c.post("/search", json={"query": "kettle"})
        assert c.post("/recommend", json={"history": []}).status_code == 200  # the rest keeps working

    assert r.status_code == 501
    assert "pip install 'fedmart[text]'" in r.json()["error"]


def test_search_disabled_is_501(client):
    r = client.post("/search", json={"query": "kettle"})

    assert r.status_code == 501 and "--no-search" in r.json()["error"]


@pytest.mark.slow
def test_search_ranks_titles_with_the_query_word_first(world, support):
    with TestClient(create_app(world.serve_config(search=True))) as c:
        assert support.wait_until(lambda: c.app.state.server.text_state == "ready", timeout=300)
        word = str(world.catalog.title[17]).split()[1]  # "<Adjective> <Noun> <number>"

        plain = c.post("/search", json={"query": word.lower(), "k": 5}).json()
        blended = c.post("/search", json={"query": word, "k": 5, "history": world.ids([1, 2, 3])}).json()
        dept = str(world.catalog.department[17])
        in_dept = c.post("/search", json={"query": word, "k": 5, "department": dept}).json()

    assert any(word in it["title"] for it in plain["items"][:5])
    assert any(word in it["title"] for it in blended["items"][:5])
    assert {it["department"] for it in in_dept["items"]} == {dept}
