"""Title search (serving/search.py): the embedding cache; a missing or broken encoder disables only /search."""

from __future__ import annotations

import logging

import pytest
import torch

import federation.text as text
from serving.search import TitleSearch

CPU = torch.device("cpu")


def test_the_embedding_cache_is_one_file_per_catalog_version_beside_the_configured_one(
    tiny_catalog, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    configured = TitleSearch(tiny_catalog, CPU, cache=tmp_path / "t.npy", blend=0.3)
    default = TitleSearch(tiny_catalog, CPU, cache=None, blend=0.3)

    assert configured.cache_path() == tmp_path / f"t-{tiny_catalog.version}.npy"
    assert default.cache_path() == tmp_path / "xdg" / "fedmart" / f"title-emb-{tiny_catalog.version}.npy"
    assert default.state == "disabled"  # until the app asks for an index


def test_without_the_text_extra_search_is_unavailable_and_says_how_to_install(tiny_catalog, monkeypatch):
    def missing():
        raise text.TextExtraMissing(f"the title encoder is not installed; {text.INSTALL_HINT}")

    monkeypatch.setattr(text, "model_dir", missing)
    search = TitleSearch(tiny_catalog, CPU, cache=None, blend=0.3)

    assert search.available() is False
    assert search.state.startswith("unavailable: ") and text.INSTALL_HINT in search.state


def test_a_broken_encoder_fails_the_index_without_raising(tiny_catalog, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("weights unreadable")

    monkeypatch.setattr(text, "TitleEncoder", broken)
    search = TitleSearch(tiny_catalog, CPU, cache=None, blend=0.3)

    with caplog.at_level(logging.ERROR, logger="serving.search"):
        search.build()

    assert search.state == "failed: weights unreadable"
    assert "search index failed" in caplog.text
    with pytest.raises(AssertionError):  # never ranks without an index
        search.rank("tea", None, None, k=1, outside=None)
