from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import conf


@pytest.fixture(scope="session")
def compose() -> Callable[..., dict[str, Any]]:
    """Hydra's composition of conf/ as plain data (the typed schema registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from conf.typed import register

    register()

    def run(overrides: Iterable[str] = (), config_name: str = "config") -> dict[str, Any]:
        with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
            return OmegaConf.to_container(cfg, resolve=True)

    return run
