"""The served version (serving/snapshot.py, serving/engine.py): startup refusals, hot swap, refused promotions."""

from __future__ import annotations

import asyncio
import logging

import httpx
import numpy as np
import pytest

from serving.config import ServeError
from serving.engine import Server
from serving.http import create_app
from serving.snapshot import fallback_scores

# starlette.testclient still runs on httpx (as FastAPI documents); its nudge towards httpx2 is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def test_no_promoted_version_is_a_clear_startup_error(tmp_path, support):
    world = support.make_world(tmp_path, num_items=40, promote=False)

    with pytest.raises(ServeError, match="no promoted version verifies"):
        Server(world.serve_config())


def test_a_version_for_another_catalog_is_refused(tmp_path, support):
    world = support.make_world(tmp_path, num_items=40)
    other = support.make_world(tmp_path / "other", num_items=41)

    with pytest.raises(ServeError, match="trained on catalog"):
        Server(world.serve_config(catalog=other.catalog_path))


def test_a_newly_promoted_version_is_swapped_in(world, client, support):
    v2 = support.publish(world, seed=2)

    assert client.app.state.server.maybe_reload() == v2

    assert client.get("/model").json()["version"] == v2
    assert client.post("/recommend", json={"history": world.ids([1]), "k": 2}).json()["model_version"] == v2


@pytest.mark.parametrize("name", ["weights.safetensors", "metadata.json"])
def test_a_tampered_promotion_is_refused_and_the_last_good_version_keeps_serving(world, client, support, caplog, name):
    v1 = world.versions[-1]
    v2 = support.publish(world, seed=2)  # signed and promoted ...
    support.flip_byte(world.registry_path / v2 / name, 50)  # ... then tampered with before the server loads it

    with caplog.at_level(logging.ERROR, logger="serving"):
        assert client.app.state.server.maybe_reload() is None

    assert f"refusing promoted version {v2}" in caplog.text and f"still serving {v1}" in caplog.text
    model = client.get("/model").json()
    assert model["version"] == v1 and v2 in model["refused"]
    assert client.post("/recommend", json={"history": world.ids([1]), "k": 2}).json()["model_version"] == v1


def test_an_unsigned_promotion_is_refused(world, client, support):
    v1 = world.versions[-1]
    v2 = support.publish(world, seed=2)
    (world.registry_path / v2 / "signature").unlink()

    client.app.state.server.maybe_reload()

    model = client.get("/model").json()
    assert model["version"] == v1 and "unsigned" in model["refused"][v2]


@pytest.mark.integration
def test_swap_under_load_drops_no_request(world, support):
    """Real HTTP: requests in flight while the poller swaps versions all succeed."""
    app = create_app(world.serve_config(reload_interval=0.05))
    history = world.ids([1, 2, 3])

    async def hammer(base: str, stop: asyncio.Event) -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:

            async def one() -> list[tuple[int, str]]:
                out = []
                while not stop.is_set():
                    r = await c.post("/recommend", json={"history": history, "k": 5})
                    out.append((r.status_code, r.json().get("model_version", "")))
                return out

            tasks = [asyncio.create_task(one()) for _ in range(8)]
            await asyncio.sleep(0.3)
            for seed in (2, 3):
                version = await asyncio.to_thread(support.publish, world, seed)
                for _ in range(600):  # until the poller has swapped it in (the load continues meanwhile)
                    if app.state.server.snapshot.version == version:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            stop.set()
            return [x for t in tasks for x in await t]

    with support.running_server(app) as base:
        results = asyncio.run(hammer(base, asyncio.Event()))

    assert results and all(status == 200 for status, _ in results)
    served = {v for _, v in results}
    assert world.versions[-1] in served and len(served) >= 2


def test_a_refused_version_is_served_once_repaired_and_promoted_again(world, client, support):
    v2 = support.publish(world, seed=2)
    weights = world.registry_path / v2 / "weights.safetensors"
    support.flip_byte(weights, 50)
    client.app.state.server.maybe_reload()
    assert client.get("/model").json()["version"] != v2

    support.flip_byte(weights, 50)  # restored from a good copy
    world.registry.promote(v2, by="pytest")

    assert client.app.state.server.maybe_reload() == v2
    assert client.get("/model").json()["refused"] == {}


class _Registry:
    """Stands in for ModelRegistry.load_popularity: the (already verified) popularity of a version, or None."""

    def __init__(self, popularity):
        self.popularity = popularity

    def load_popularity(self, version, public_key):
        return self.popularity


@pytest.mark.parametrize("published", [[5, 1, 3], [0, 5, 1, 3]])
def test_published_popularity_is_the_fallback_with_index_0_unused(published):
    kind, scores = fallback_scores(_Registry(published), "v1", None, {}, num_items=3)

    assert kind == "popularity"
    assert scores.tolist() == [0.0, 5.0, 1.0, 3.0] and scores.dtype == np.float64


def test_popularity_of_the_wrong_length_is_ignored_for_the_model_prior(caplog):
    bias = np.array([0.0, -1.0, 2.0, 0.5], dtype=np.float32)

    with caplog.at_level(logging.WARNING, logger="serving.snapshot"):
        kind, scores = fallback_scores(_Registry([1, 2]), "v1", None, {"head.bias": bias}, num_items=3)

    assert kind == "model_prior" and scores.tolist() == bias.tolist()
    assert "popularity has 2 entries, the catalog 3 items; ignored" in caplog.text


def test_without_popularity_or_output_bias_the_fallback_is_catalog_order():
    kind, scores = fallback_scores(_Registry(None), "v1", None, {"head.bias": np.zeros(2)}, num_items=3)

    assert kind == "catalog_order"
    assert np.argsort(-scores[1:], kind="stable").tolist() == [0, 1, 2]
