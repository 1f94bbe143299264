"""A node's privacy ledger: every DP training on one population of users, persisted on the node's disk.

The ledger is the node's own record of what its users' data has spent, across rounds,
runs and restarts. It is the accountant's full history (Opacus's
``(noise_multiplier, sample_rate, num_steps)`` entries) for one dataset, written to a
JSON file before the update it pays for leaves the node, and never held only in
memory. ``epsilon`` is computed from the whole history by the Opacus accountant, so
it is the per-user epsilon at this node under the assumptions of :mod:`privacy.dp`
(one example = one user's whole history at this node, Poisson sampling, the same
delta for the life of the dataset).

Durability
----------
``record`` re-reads the file under an exclusive lock, appends, writes a temporary file
in the same directory, ``fsync``\\ s it, ``os.replace``\\ s it over the ledger and
``fsync``\\ s the directory. A crash at any point leaves either the old or the new
ledger, never a torn file and never a lower spend. A file that cannot be parsed is
an error, never an empty ledger.

Idempotence
-----------
Each entry carries ``(run, round, training_id)``. Recording the same triple again
(a retried ``record`` after a crash) adds nothing. A *new* training is a new release and
is always recorded, also for a ``(run, round)`` that already has an entry, e.g. when a
restarted coordinator asks again for a round the node had trained: fedmart's node then
trains again with fresh noise and spends budget again. It never re-sends the recorded
update, because two secure sums over different survivor sets that both contain the same
update reveal it exactly (their difference).
Without ``training_id`` every ``record`` is a new training (safe, never idempotent).

Identity and pins
-----------------
A ledger belongs to a *population*: the node's users, named by a random id kept in the
node's own state (not a hash of the data, so appending interactions keeps the spend, and
the id tells nobody anything about the data). The δ and the accountant are pinned in the
file at the first spend: a ledger never reads with another δ (a larger δ makes the same
history read as a smaller ε), and :meth:`PrivacyLedger.check` refuses a different one.
Version-1 files (keyed by a content hash, without pins) are adopted as they are: their
spend is kept, and the pins are set at the next spend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from privacy.accounting import HistoryEntry, epsilon, epsilon_after, validate_history

try:  # POSIX; elsewhere the ledger still writes atomically, without cross-process locking
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["LedgerError", "LedgerEntry", "Decision", "PrivacyLedger"]

log = logging.getLogger(__name__)

_FORMAT = "fedmart-privacy-ledger"
_VERSION = 2
_READABLE = (1, 2)


class LedgerError(ValueError):
    """The ledger file is unreadable, for another population, or inconsistent."""


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training on the ledger's dataset."""

    run: str
    round: int
    training_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: float

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Decision:
    """The answer of :meth:`PrivacyLedger.check`.

    ``reason`` is ``"<code>: <message>"`` with ``code`` one of ``ok``,
    ``budget_exhausted`` (already at or over ``max_epsilon``) and ``budget_exceeded``
    (this training would cross it); ``code`` gives the code alone.
    """

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class PrivacyLedger:
    """The persisted privacy spend of one population of users at one node.

    Parameters
    ----------
    path : str or Path
        The ledger's JSON file on the node's own disk; created (with its directory)
        when missing.
    population_id : str
        The node's population (its users): a stable random id from the node's own state.
        A ledger file of another population is an error: spends never mix.

    Raises
    ------
    LedgerError
        The file exists but is unreadable, of another format, or for another population.
    """

    def __init__(self, path: str | Path, *, population_id: str) -> None:
        if not isinstance(population_id, str) or not population_id:
            raise ValueError("population_id must be a non-empty string")
        self.path = Path(path)
        self.population_id = population_id
        self.pinned_delta: float | None = None
        self.pinned_accountant: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self.path.exists():
                self._entries = self._read()
            else:
                self._entries = []
                self._write([])
                log.info("privacy ledger created at %s for population %r", self.path, population_id)

    # ---- reading -------------------------------------------------------------------

    @property
    def entries(self) -> list[LedgerEntry]:
        """All recorded trainings, oldest first (as of the last read or write)."""
        return list(self._entries)

    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant history: ``(noise_multiplier, sample_rate, steps)`` per training."""
        return [e.history_entry for e in self._entries]

    def entries_for(self, *, run: str, round: int) -> list[LedgerEntry]:
        """Trainings recorded for ``(run, round)``: non-empty means this round was trained."""
        return [e for e in self._entries if e.run == run and e.round == round]

    def reload(self) -> None:
        """Re-read the file (another process may have recorded)."""
        with self._locked():
            self._entries = self._read()

    def epsilon(self, delta: float, *, accountant: str = "rdp") -> float:
        """Total epsilon spent at ``delta``, by the Opacus accountant over the whole history."""
        self._check_pins(delta, accountant)
        return epsilon(self.history, delta=delta, accountant=accountant)

    def _pin(self, delta: float | None, accountant: str | None) -> None:
        """Pin what is not pinned yet; refuse what differs from a pin."""
        self._check_pins(
            delta if delta is not None and self.pinned_delta is not None else self.pinned_delta,
            accountant if accountant is not None and self.pinned_accountant is not None else self.pinned_accountant,
        )
        if self.pinned_delta is None and delta is not None:
            self.pinned_delta = float(delta)
        if self.pinned_accountant is None and accountant is not None:
            self.pinned_accountant = str(accountant)

    def _check_pins(self, delta: float | None, accountant: str | None) -> None:
        if self.pinned_delta is not None and delta is not None and delta != self.pinned_delta:
            raise LedgerError(
                f"privacy ledger {self.path} is pinned to delta {self.pinned_delta:.6g}; it never reads at another "
                f"delta ({delta:.6g}): a larger delta would make the same spend read as a smaller epsilon"
            )
        if self.pinned_accountant is not None and accountant is not None and accountant != self.pinned_accountant:
            raise LedgerError(
                f"privacy ledger {self.path} is pinned to the {self.pinned_accountant!r} accountant, not {accountant!r}"
            )

    def epsilon_after(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        delta: float,
        accountant: str = "rdp",
    ) -> float:
        """Epsilon after one more training of ``steps`` steps with these parameters
        (:func:`privacy.accounting.epsilon_after` on this ledger's history)."""
        self._check_pins(delta, accountant)
        return epsilon_after(
            self.history,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )

    def check(
        self,
        *,
        max_epsilon: float | None,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str = "rdp",
    ) -> Decision:
        """May this node run a training with these parameters within ``max_epsilon``?

        ``max_epsilon`` is the node's own budget (node configuration; the coordinator
        cannot raise it). ``None`` or ``inf`` means no limit. Reading the file first,
        so a spend recorded by another process counts.
        """
        if max_epsilon is not None and not (max_epsilon > 0):
            raise ValueError(f"max_epsilon must be > 0 or None, got {max_epsilon}")
        self.reload()
        now = self.epsilon(delta, accountant=accountant)
        after = self.epsilon_after(noise_multiplier, sample_rate, steps, delta=delta, accountant=accountant)
        limit = math.inf if max_epsilon is None else float(max_epsilon)
        if now >= limit:
            return Decision(
                False, now, after, f"budget_exhausted: epsilon spent {now:.4g} has reached max_epsilon {limit:.4g}"
            )
        if after > limit:
            return Decision(
                False,
                now,
                after,
                f"budget_exceeded: this training would take epsilon from {now:.4g} to {after:.4g} "
                f"> max_epsilon {limit:.4g} (delta {delta:.3g}, {accountant})",
            )
        return Decision(True, now, after, f"ok: epsilon {now:.4g} -> {after:.4g} <= max_epsilon {limit:.4g}")

    # ---- writing -------------------------------------------------------------------

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        round: int,
        run: str,
        training_id: str | None = None,
        delta: float | None = None,
        accountant: str | None = None,
    ) -> bool:
        """Persist one training's spend before its update leaves the node.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            ``PrivateTraining.spent()``: the parameters and the number of noised steps.
        round, run
            Which federated round of which run this training answered.
        training_id : str or None
            ``PrivateTraining.training_id``. Re-recording the same ``(run, round,
            training_id)`` is a no-op; ``None`` means a new, unique training.
        delta, accountant : optional
            What the node accounts this spend at: pinned at the first spend, refused if
            they differ from the pins afterwards.

        Returns
        -------
        bool
            True if an entry was added, False if this training was already recorded.

        Raises
        ------
        LedgerError
            The same training recorded with different parameters, or an unreadable file.
        """
        (sigma, q, n_steps) = validate_history([(noise_multiplier, sample_rate, steps)])[0]
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        if not isinstance(run, str) or not run:
            raise ValueError("run must be a non-empty string")
        tid = training_id if training_id is not None else uuid.uuid4().hex
        with self._locked():
            entries = self._read()  # never overwrite a spend recorded meanwhile
            self._pin(delta, accountant)
            for e in entries:
                if (e.run, e.round, e.training_id) == (run, round, tid):
                    if e.history_entry != (sigma, q, n_steps):
                        raise LedgerError(
                            f"training {tid!r} of run {run!r} round {round} is already recorded with "
                            f"{e.history_entry}, not {(sigma, q, n_steps)}"
                        )
                    self._entries = entries
                    log.info("privacy ledger: run %r round %d already recorded, nothing added", run, round)
                    return False
            if any((e.run, e.round) == (run, round) for e in entries):
                log.warning(
                    "privacy ledger: run %r round %d was already trained; recording this new training as well",
                    run,
                    round,
                )
            entry = LedgerEntry(run, round, tid, sigma, q, n_steps, time.time())
            self._write([*entries, entry])
            self._entries = [*entries, entry]
        return True

    # ---- file ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read(self) -> list[LedgerEntry]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LedgerError(f"privacy ledger {self.path} cannot be read ({e}); refusing to treat it as empty") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise LedgerError(f"{self.path} is not a fedmart privacy ledger")
        version = data.get("version")
        if version not in _READABLE:
            raise LedgerError(f"privacy ledger {self.path} has version {version}, expected one of {_READABLE}")
        if version == 1:
            # Keyed by a content hash, before populations: adopt its spend (never drop it).
            log.warning(
                "privacy ledger %s (version 1, dataset %r) is adopted by population %r; its spend counts",
                self.path,
                data.get("dataset_id"),
                self.population_id,
            )
        elif data.get("population_id") != self.population_id:
            raise LedgerError(
                f"privacy ledger {self.path} belongs to population {data.get('population_id')!r}, not "
                f"{self.population_id!r}; use one ledger file per population"
            )
        pins = data.get("pinned") or {}
        self.pinned_delta = float(pins["delta"]) if pins.get("delta") is not None else None
        self.pinned_accountant = str(pins["accountant"]) if pins.get("accountant") is not None else None
        try:
            entries = [
                LedgerEntry(
                    run=str(e["run"]),
                    round=int(e["round"]),
                    training_id=str(e["training_id"]),
                    noise_multiplier=float(e["noise_multiplier"]),
                    sample_rate=float(e["sample_rate"]),
                    steps=int(e["steps"]),
                    recorded_at=float(e["recorded_at"]),
                )
                for e in data["entries"]
            ]
            validate_history([e.history_entry for e in entries])
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"privacy ledger {self.path} has a malformed entry: {e}") from e
        return entries

    def _write(self, entries: list[LedgerEntry]) -> None:
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "population_id": self.population_id,
            "pinned": {"delta": self.pinned_delta, "accountant": self.pinned_accountant},
            "accountant_history_fields": ["noise_multiplier", "sample_rate", "steps"],
            "entries": [asdict(e) for e in entries],
        }
        data = (json.dumps(payload, indent=1) + "\n").encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, population_id={self.population_id!r}, {len(self._entries)} entries)"


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
