"""The session ids a node has already taken part in, kept on disk so that a restart does not reopen replay.

A node refuses a share-keys message whose session id it has seen (active mode): replaying an
old session's messages to it, or reusing an id across rounds, fails at once. The ids live in
``<state_dir>/secagg-seen.json`` (the node's own state directory, never the coordinator's),
written atomically, pruned to the newest ``keep``. Without a directory (a test, or a node with
no state directory) they live in memory only, and say so in the log once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["SEEN_FILE", "SeenSessions"]

log = logging.getLogger(__name__)

SEEN_FILE = "secagg-seen.json"


class SeenSessions:
    """A persisted set of session ids (bytes), newest last, at most ``keep`` of them.

    Parameters
    ----------
    state_dir : Path or None
        The node's state directory; ``None`` keeps the ids in memory only.
    keep : int
        How many ids to remember. A session older than the last ``keep`` could be replayed to
        this node, but its keys were signed for its own round, so nothing from it verifies now.
    """

    def __init__(self, state_dir: str | Path | None = None, *, keep: int = 1000) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.path = Path(state_dir) / SEEN_FILE if state_dir is not None else None
        self.keep = keep
        self._memory: list[str] = []
        if self.path is None:
            log.info("secagg: seen sessions kept in memory only (no state directory): a restart forgets them")

    def _load(self) -> list[str]:
        if self.path is None:
            return self._memory
        if not self.path.is_file():
            return []
        values = json.loads(self.path.read_text())
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{self.path}: not a list of session ids; delete it only if you know why it is wrong")
        return values

    def __contains__(self, session: object) -> bool:
        return isinstance(session, bytes | bytearray) and bytes(session).hex() in self._load()

    def add(self, session: bytes) -> None:
        """Remember ``session`` (atomically on disk), dropping the oldest beyond ``keep``."""
        ids = [v for v in self._load() if v != session.hex()]
        ids = [*ids, session.hex()][-self.keep :]
        if self.path is None:
            self._memory = ids
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(ids))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
