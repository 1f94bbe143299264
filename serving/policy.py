"""What a promoted version must satisfy before ``fedmart serve`` serves it.

Two checks beside the signatures (``serving/snapshot.py`` runs them on every selection):

* **``--require``**, read from the version's *signed* ``privacy`` metadata
  (``federation/server.py`` ``privacy_summary`` and ``federation/trail.py``):

  ========================  ==================================================================
  ``dp``                    ``privacy.mode`` is ``dp`` or ``target`` (DP-SGD at every node)
  ``secagg``                ``privacy.secagg.enabled`` is true (the coordinator saw only sums)
  ``epsilon<=X``            ``privacy.epsilon_max``, the largest ε any node reported over the
                            run up to this version, is a number ``<= X`` (``<`` works too)
  ========================  ==================================================================

  Anything missing from the metadata (a version from before these fields) does not satisfy.
* **The promotion counter never goes backwards** (:class:`HighWater`): the server remembers
  the highest signed promotion it has served, in memory and, with a state file, across
  restarts. A newest promotion below it means ``promotions.jsonl`` lost its newest lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HighWater", "Requirements", "default_state_path"]

log = logging.getLogger(__name__)

_EPSILON = re.compile(r"^\s*(?:epsilon|eps|ε)\s*(<=|<)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
DP_MODES = ("dp", "target")


def _number(value: Any) -> float | None:
    """A metadata number (canonical JSON writes inf as the string "inf"); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Requirements:
    """Parsed ``--require`` terms; :meth:`unmet` says why a version's metadata fails them."""

    dp: bool = False
    secagg: bool = False
    max_epsilon: float | None = None
    strict: bool = False  # epsilon < X rather than <= X

    @classmethod
    def parse(cls, terms: list[str] | tuple[str, ...]) -> Requirements:
        """``["dp", "epsilon<=8", "secagg"]`` (each item may also be comma-separated); ValueError on anything else."""
        dp = secagg = strict = False
        max_epsilon: float | None = None
        for term in (t.strip() for item in terms for t in str(item).split(",")):
            if not term:
                continue
            low = term.lower()
            if low == "dp":
                dp = True
            elif low == "secagg":
                secagg = True
            elif m := _EPSILON.match(low):
                bound = float(m.group(2))
                if max_epsilon is None or bound < max_epsilon:
                    max_epsilon, strict = bound, m.group(1) == "<"
            else:
                raise ValueError(f"--require {term!r}: expected dp, secagg or epsilon<=X")
        return cls(dp=dp, secagg=secagg, max_epsilon=max_epsilon, strict=strict)

    def __str__(self) -> str:
        terms = ["dp"] * self.dp + ["secagg"] * self.secagg
        if self.max_epsilon is not None:
            terms.append(f"epsilon{'<' if self.strict else '<='}{self.max_epsilon:g}")
        return ",".join(terms) or "nothing"

    def unmet(self, metadata: dict[str, Any]) -> str | None:
        """Why the signed ``metadata`` does not satisfy these requirements, or None."""
        privacy = metadata.get("privacy")
        privacy = privacy if isinstance(privacy, dict) else {}
        if self.dp and privacy.get("mode") not in DP_MODES:
            return f"--require dp: the signed metadata says privacy mode {privacy.get('mode')!r} (no DP-SGD)"
        if self.secagg:
            secagg = privacy.get("secagg")
            if not (isinstance(secagg, dict) and secagg.get("enabled") is True):
                return "--require secagg: the signed metadata does not record secure aggregation on"
        if self.max_epsilon is not None:
            eps = _number(privacy.get("epsilon_max"))
            op = "<" if self.strict else "<="
            if eps is None or math.isnan(eps):
                return f"--require epsilon{op}{self.max_epsilon:g}: the signed metadata records no ε"
            if eps > self.max_epsilon or (self.strict and eps == self.max_epsilon):
                return f"--require epsilon{op}{self.max_epsilon:g}: the signed metadata records ε {eps:g}"
        return None


def default_state_path(registry: Path) -> Path:
    """``$XDG_STATE_HOME/fedmart/serve-<registry name>-<hash of its absolute path>.json`` (outside the registry)."""
    import hashlib

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedmart"
    resolved = str(Path(registry).resolve())
    return base / f"serve-{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}.json"


class HighWater:
    """The highest promotion counter served so far (and its version), optionally kept in a state file.

    The file must live where whoever can write the registry cannot (the default is under the
    serving user's ``$XDG_STATE_HOME``): it is what makes a rollback visible after a restart.
    A file written for another signing key is ignored with a warning.
    """

    def __init__(
        self, path: Path | None, key_id: str, *, kind: str = "promotion", source: str = "promotions.jsonl"
    ) -> None:
        self.path = path
        self.key_id = key_id
        self.kind = kind  # what the counter counts: "promotion", "catalog version"
        self.source = source  # where the records live, named in a refusal
        self.counter: int = 0
        self.version: str | None = None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("key_id") == key_id:
                    self.counter, self.version = int(data["counter"]), str(data["version"])
                else:
                    log.warning("%s was written for signing key %s, not %s; ignored", path, data.get("key_id"), key_id)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}: not a fedmart serve state file ({exc}); remove it only if you trust why"
                ) from exc

    def refusal(self, counter: int, version: str) -> str | None:
        """Why serving promotion ``counter`` of ``version`` would be a rollback, or None."""
        if counter < self.counter:
            return (
                f"{self.kind} #{counter} is older than #{self.counter} ({self.version}) already served: "
                f"{self.source} was rolled back"
            )
        if counter == self.counter and version != self.version:
            return (
                f"{self.kind} #{counter} names {version}, but #{counter} served {self.version}: "
                f"{self.source} was rewritten"
            )
        return None

    def advance(self, counter: int, version: str) -> None:
        """Record promotion ``counter`` as served (and persist it, atomically)."""
        if counter < self.counter:
            return
        self.counter, self.version = counter, version
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key_id": self.key_id, "counter": counter, "version": version}) + "\n")
        os.replace(tmp, self.path)
