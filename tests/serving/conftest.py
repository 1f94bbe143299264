"""Fixtures for the serving tests: a signed world of 300 items and an in-process client of its API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serving.http import create_app


@pytest.fixture
def world(tmp_path, support):
    return support.make_world(tmp_path, num_items=300)


@pytest.fixture
def client(world):
    with TestClient(create_app(world.serve_config())) as c:
        yield c
