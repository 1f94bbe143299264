"""Serving a newer signed catalog (serving/catalog_view.py, serving/served_model.py, serving/snapshot.py).

The model's rows are mapped onto the served catalog by item_id: items in both keep their
rows, removed items are never recommended nor found, an ID-only model never ranks a new item
above one it learned. A catalog swap is a hot swap like a model's.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from federation.catalog_map import align
from serving.config import ServeError
from serving.engine import Server
from serving.http import create_app
from serving.search import _zscore, tower_space
from serving.served_model import map_fallback

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

NEW = (("new-1", "Zanzibar Copper Samovar Deluxe"), ("new-2", "Quilted Velvet Hammock"))


@pytest.fixture
def signed(tmp_path, support):
    """A world of 60 items whose registry holds its catalog as signed catalog version #1."""
    world = support.make_world(tmp_path, num_items=60)
    world.registry.catalogs.publish(world.catalog, by="pytest")
    return world


def _grow(world, support, *, remove: tuple[str, ...] = ()) -> str:
    grown = support.edit_catalog(world.catalog, add=NEW, remove=remove)
    return world.registry.catalogs.publish(grown, by="pytest").name


def _ids(body: dict) -> list[str]:
    return [it["item_id"] for it in body["items"]]


def test_a_newer_signed_catalog_is_swapped_in_and_mapped_by_item_id(signed, support):
    removed = tuple(signed.catalog.item_id[[0, 5, 9]].tolist())
    history = signed.ids([1, 2, 3])
    with TestClient(create_app(signed.serve_config())) as c:
        before = c.post("/recommend", json={"history": history, "k": 10, "exclude_seen": False}).json()
        name = _grow(signed, support, remove=removed)

        assert c.app.state.server.maybe_reload() == f"catalog {name}"

        model = c.get("/model").json()
        after = c.post("/recommend", json={"history": history, "k": 10, "exclude_seen": False}).json()
        every = c.post("/recommend", json={"history": history, "k": 59}).json()
        cold = c.post("/recommend", json={"history": [], "k": 59}).json()
        gone = c.get(f"/items/{removed[0]}")
        new_item = c.get("/items/new-1")
        with_removed = c.post("/recommend", json={"history": [removed[1], *history], "k": 5}).json()

    assert model["catalog"]["name"] == name and model["catalog"]["counter"] == 2
    assert (model["catalog"]["added"], model["catalog"]["removed"]) == (2, 3)
    assert model["catalog"]["new_items_scored"] is False and model["num_items"] == 59
    assert model["version"] == signed.versions[-1]  # the same model, on the new catalog
    # Items in both catalogs keep their rows: the same scores, so the same ranking minus removed items.
    kept = [i for i in _ids(before) if i not in removed]
    assert _ids(after)[: len(kept)] == kept
    scores_before = {it["item_id"]: it["score"] for it in before["items"]}
    assert all(abs(it["score"] - scores_before[it["item_id"]]) < 1e-4 for it in after["items"] if it["item_id"] in kept)
    # Removed items are never recommended; an ID-only model does not rank new items at all.
    assert not set(removed) & set(_ids(every)) and not {"new-1", "new-2"} & set(_ids(every))
    assert len(every["items"]) == 59 - 3 - 2  # every item the model learned, minus the history
    # The cold-start ranking puts new items after every known one.
    assert _ids(cold)[-2:] == ["new-1", "new-2"] and not set(removed) & set(_ids(cold))
    assert gone.status_code == 404 and new_item.json()["title"] == NEW[0][1]
    assert with_removed["unknown_items"] == [removed[1]]


def test_a_tampered_or_rolled_back_catalog_is_refused_and_the_current_one_serves_on(signed, support, caplog):
    with TestClient(create_app(signed.serve_config())) as c:
        server = c.app.state.server
        good = _grow(signed, support)
        assert server.maybe_reload() == f"catalog {good}"
        bad = support.edit_catalog(signed.catalog, add=(("new-9", "Forged Thing"),))
        bad_name = signed.registry.catalogs.publish(bad, by="pytest").name
        support.flip_byte(signed.registry.catalogs.dir / bad_name / "catalog.parquet", 40)

        with caplog.at_level(logging.ERROR, logger="serving"):
            assert server.maybe_reload() is None
        shutil.rmtree(signed.registry.catalogs.dir / bad_name)
        shutil.rmtree(signed.registry.catalogs.dir / good)  # a rollback to #1
        assert server.maybe_reload() is None
        model = c.get("/model").json()

    assert model["catalog"]["name"] == good
    assert "sha256" in model["refused"][f"catalog {bad_name}"]
    assert "catalog version #1 is older than #2" in model["refused"][f"catalog c0001-{signed.catalog.version}"]
    assert f"refusing catalog version {bad_name}" in caplog.text


def test_a_restart_does_not_go_back_to_an_older_catalog(signed, support, tmp_path):
    state = tmp_path / "state" / "serve.json"
    with TestClient(create_app(signed.serve_config(state=state))) as c:
        good = _grow(signed, support)
        assert c.app.state.server.maybe_reload() == f"catalog {good}"
    shutil.rmtree(signed.registry.catalogs.dir / good)

    with pytest.raises(ServeError, match="catalog version #1 is older than #2"):
        Server(signed.serve_config(state=state))


def test_a_version_trained_on_a_catalog_nobody_signed_is_refused(tmp_path, support):
    world = support.make_world(tmp_path, num_items=40)
    other = support.make_world(tmp_path / "other", num_items=41)
    world.registry.catalogs.publish(other.catalog, by="pytest")  # the registry serves a catalog ...

    with pytest.raises(ServeError, match="trained on catalog .* neither the served catalog"):
        Server(world.serve_config(catalog=None))  # ... the model's own is nowhere to be found


def test_without_a_signed_catalog_the_catalog_file_serves_and_a_signed_one_replaces_it(world, support):
    with TestClient(create_app(world.serve_config())) as c:  # --catalog, a registry with no catalogs/
        assert c.get("/model").json()["catalog"]["name"] is None
        name = _grow(world, support)  # its training catalog is the --catalog file: found by digest

        assert c.app.state.server.maybe_reload() == f"catalog {name}"
        assert c.get("/model").json()["catalog"]["added"] == 2


def test_serve_without_any_catalog_says_how_to_get_one(world):
    with pytest.raises(ServeError, match="no signed catalog version: pass --catalog PATH"):
        Server(world.serve_config(catalog=None))


def test_map_fallback_keeps_known_scores_and_puts_new_items_last(tiny_catalog, support):
    new = support.edit_catalog(tiny_catalog, add=(("n1", "x"),), remove=("i2",))
    scores = np.array([0.0, 5.0, 9.0, 1.0, 0.0, 3.0, 2.0])  # i1..i6

    out = map_fallback(scores, align(tiny_catalog, new))

    assert out.tolist() == [0.0, 5.0, 1.0, 0.0, 3.0, 2.0, -1.0]  # i2 gone, n1 below the lowest known


def test_zscore_gives_unscored_items_the_lowest_finite_score():
    z = _zscore(torch.tensor([1.0, -float("inf"), 3.0]))

    assert torch.isfinite(z).all() and z[1] == z.min() and z[2] == z.max()


def test_tower_space_reads_a_tied_tower_and_ignores_other_models():
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.eye(2, 3))

        def rows(self):
            return torch.tensor([[0.0, 0.0], [3.0, 4.0]])

    model = torch.nn.Module()
    model.tower = Tower()

    rows, project = tower_space(model)

    assert rows[1].tolist() == pytest.approx([0.6, 0.8])
    assert project(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0]
    assert tower_space(torch.nn.Linear(2, 2)) is None


@pytest.mark.slow
@pytest.mark.integration
def test_a_catalog_reload_under_load_fails_no_request_and_search_finds_the_new_item(signed, support):
    """Real HTTP: requests keep coming while a signed catalog adding items is embedded and swapped in."""
    app = create_app(signed.serve_config(search=True, reload_interval=0.05))
    history = signed.ids([1, 2, 3])
    title = NEW[0][1]

    async def hammer(base: str) -> tuple[list[int], dict, dict]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            stop = asyncio.Event()

            async def one(i: int) -> list[int]:
                out = []
                while not stop.is_set():
                    if i % 2:
                        r = await c.post("/recommend", json={"history": history, "k": 5})
                    else:
                        r = await c.post("/search", json={"query": "kettle", "k": 5, "history": history[:1]})
                    out.append(r.status_code)
                return out

            tasks = [asyncio.create_task(one(i)) for i in range(6)]
            await asyncio.sleep(0.3)
            name = await asyncio.to_thread(_grow, signed, support)
            for _ in range(1200):  # until the poller has embedded the new titles and swapped
                if app.state.server.snapshot.view.name == name:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            stop.set()
            statuses = [s for t in tasks for s in await t]
            found = (await c.post("/search", json={"query": title, "k": 10})).json()
            model = (await c.get("/model")).json()
            return statuses, found, model

    with support.running_server(app) as base:
        assert support.wait_until(lambda: app.state.server.text_state == "ready", timeout=300)
        statuses, found, model = asyncio.run(hammer(base))

    assert statuses and set(statuses) == {200}, f"failed requests: {sorted(set(statuses) - {200})}"
    assert model["catalog"]["added"] == 2
    assert "new-1" in _ids(found)[:10]


def test_a_text_tower_version_ranks_a_new_item_by_its_text_at_once(signed, support):
    """``model=sasrec_text``: a new item's score is the tower's own (its text, a zero residual and bias)."""
    from federation.globalmodel import get_weights, set_weights
    from federation.model import SASRecConfig, create
    from federation.text import TEXT_DIM, item_text_embeddings

    tiny = {"hidden": 16, "layers": 1, "heads": 1, "max_len": 12, "dropout": 0.0, "attn_dropout": 0.0}
    cfg = SASRecConfig(num_items=signed.catalog.num_items, text_dim=TEXT_DIM, tower=True, **tiny)
    torch.manual_seed(3)
    model = create(cfg, text_embeddings=item_text_embeddings(signed.catalog, signed.root))
    with torch.no_grad():  # as if trained: every known item has a learned residual and bias
        model.tower.residual[1:].normal_(std=0.05)
        model.tower.bias[1:].normal_(std=0.05)
    weights = get_weights(model)
    version = signed.registry.publish(
        weights, run="tower", round=9, config_hash="cfg", catalog_version=signed.catalog.version,
        model_config=cfg.to_dict(), metrics={}, privacy={"epsilon": 2.0, "delta": 1e-5}, parent=signed.versions[-1],
    )  # fmt: skip
    signed.registry.promote(version, by="pytest")
    history = signed.ids([1, 2, 3])
    with TestClient(create_app(signed.serve_config(text_cache=signed.root / "cache" / "t.npy"))) as c:
        c.app.state.server.maybe_reload()
        grown_name = _grow(signed, support)
        assert c.app.state.server.maybe_reload() == f"catalog {grown_name}"
        model_info = c.get("/model").json()
        ranked = c.post("/recommend", json={"history": history, "k": 62, "exclude_seen": False}).json()

    assert model_info["version"] == version and model_info["catalog"]["new_items_scored"] is True
    scores = {it["item_id"]: it["score"] for it in ranked["items"]}
    assert {"new-1", "new-2"} <= set(scores)  # ranked among the learned items, not after them
    # The reference: the same weights on the grown catalog, the new items' residual and bias zero.
    grown = support.edit_catalog(signed.catalog, add=NEW)
    ref = create(
        SASRecConfig(num_items=grown.num_items, text_dim=TEXT_DIM, tower=True, **tiny),
        text_embeddings=item_text_embeddings(grown, signed.root),
    ).eval()
    padded = dict(weights)
    padded["tower.residual"] = np.concatenate([weights["tower.residual"], np.zeros((2, 16), np.float32)])
    padded["tower.bias"] = np.concatenate([weights["tower.bias"], np.zeros(2, np.float32)])
    set_weights(ref, padded)
    idx = [int(np.flatnonzero(grown.item_id == i)[0]) + 1 for i in history]
    expected = ref.score_last(torch.tensor([[0] * (12 - len(idx)) + idx]))[0]  # left-padded to max_len, as served
    for k, item in enumerate(("new-1", "new-2")):
        assert abs(scores[item] - float(expected[grown.num_items - 1 + k])) < 1e-4, (item, scores[item])
