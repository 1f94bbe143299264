"""The one place that chooses where tensors live: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch

__all__ = ["select_device"]


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``/``cuda`` force a choice.

    Raises ``ValueError`` when ``cuda`` is asked for on a machine without it.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but no CUDA device is available; use device=auto or cpu")
    if preference not in ("cpu",) and not preference.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {preference!r}")
    return torch.device(preference)
