"""What ``fedmart serve`` is configured with, and the error that stops it from starting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ServeConfig", "ServeError", "default_threads"]


class ServeError(RuntimeError):
    """The server cannot start (no verified promoted version, no catalog to map it onto, bad key file)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``fedmart serve`` needs; keys and secrets are paths or env, never config values."""

    registry: Path
    public_key: Path
    catalog: Path | None = None  # used only while the registry has no signed catalog version
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    reload_interval: float = 10.0
    device: str = "auto"
    max_batch: int = 64
    threads: int | None = None  # torch intra-op threads; None: default_threads()
    search: bool = True  # build the title index for /search (in the background)
    text_cache: Path | None = None  # .npy cache of title embeddings, one file per catalog version beside it
    search_blend: float = 0.3  # weight of the recommender in /search when a history is given
    require: tuple[str, ...] = ()  # --require terms: dp, secagg, epsilon<=X (serving/policy.py)
    state: Path | None = None  # the highest promotion counter served, kept across restarts; None: in memory only

    def __post_init__(self) -> None:
        from serving.policy import Requirements

        Requirements.parse(self.require)  # a ValueError names the bad term
        if self.reload_interval <= 0:
            raise ValueError("reload_interval must be > 0 seconds")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0.0 <= self.search_blend <= 1.0:
            raise ValueError("search_blend must be in [0, 1]")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key must be at least 8 characters")


def default_threads() -> int:
    """Torch threads for inference: all cores but one, which the event loop (HTTP, JSON) needs.

    On a small CPU, intra-op threads that compete with the event loop cost far more
    than they give: measured on 2 cores, a batch-1 forward took 3x longer with 2
    threads than with 1 while the server was under load.
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
