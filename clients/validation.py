"""Data governance: validate an interactions table against the schema and the catalog.

Two kinds of rows are not trained on, and they are told apart:

- **corruption** (:data:`REASONS`: null ids, unparseable or impossible timestamps, items
  not in the catalog, duplicates) is *quarantined*: the quarantine table holds each row
  with its reason, and a node tolerates only a share of it (``--max-quarantine-fraction``);
- **short histories** (users with fewer than ``min_history`` valid events) are the
  node's nature, not an error: their rows are set aside (leave-one-out needs three
  events) and counted as a statistic, never against a tolerance.

Every input row ends up in exactly one place: the clean :class:`Interactions`, the
quarantine table, or the short-history rows. Nothing is dropped silently, and
:func:`summary` puts every count in one line. Fatal problems (a missing required
column) raise :class:`~clients.interactions.DataError` with a one-line message instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clients.interactions import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, DataError, Interactions
from federation.catalog import Catalog

__all__ = [
    "REASONS",
    "SHORT_HISTORY",
    "ValidationResult",
    "id_strings",
    "quarantine_refusal",
    "quarantined_phrase",
    "summary",
    "usable_table",
    "validate",
    "write_report",
]

# Corruption: reason code -> what it means and how to fix it. Order is precedence: a row
# gets the first reason that applies to it.
REASONS: dict[str, str] = {
    "null_id": "user_id or item_id is null or empty; fill in the id or remove the row at the source",
    "unmapped_item": "the department's item id has no entry in the item mapping (--map-file); add it there",
    "bad_type": "timestamp is missing or is neither a number of seconds nor an ISO-8601 date",
    "unknown_item": "item_id is not in the catalog; add the item to the catalog or fix the id",
    "timestamp_out_of_range": "timestamp lies outside the allowed range (before the epoch or in the future)",
    "duplicate": "an identical (user_id, item_id, timestamp, event) row appeared earlier; the first copy is kept",
}
# Not corruption: a statistic of the node's users (set aside, never counted against a tolerance).
SHORT_HISTORY = "short_history"
_SHORT_CODE = len(REASONS)  # its code in ValidationResult.row_reason
_SHORT_NOTE = (
    "users with fewer valid events than min_history: their rows are not trained on (leave-one-out needs "
    "three events); a statistic of the data, not an error"
)
_WORDS = {  # for the one-line summary
    "null_id": "null id",
    "unmapped_item": "unmapped item",
    "bad_type": "bad timestamp",
    "unknown_item": "unknown item",
    "timestamp_out_of_range": "timestamp out of range",
    "duplicate": "duplicate",
}

_DAY = 86_400


@dataclass
class ValidationResult:
    """Clean interactions, the report, and where every other row went.

    ``row_reason`` and ``timestamp`` are per input row: the row's fate (``-1`` clean, an
    index into :data:`REASONS`, or ``len(REASONS)`` for a short history) and its parsed
    time in seconds.
    """

    interactions: Interactions
    report: dict
    quarantine: pa.Table  # corrupt rows only, with _row and _reason
    row_reason: np.ndarray  # (n,) int8
    timestamp: np.ndarray  # (n,) int64 seconds

    @property
    def ok(self) -> bool:
        """No corruption (short histories are a statistic, not a problem)."""
        return self.report["rows_quarantined"] == 0


def id_strings(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Ids as validation reads them: strings, trimmed, empty ones null."""
    col = col.cast(pa.string()) if col.type != pa.string() else col
    # Empty or whitespace-only strings count as missing ids.
    stripped = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)


def _parse_timestamps(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Return (seconds int64, parsed-ok mask)."""
    n = len(col)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        secs = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
        ok = pc.is_valid(secs).to_numpy(zero_copy_only=False)
        return np.nan_to_num(secs.to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64), ok
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        vals = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.isfinite(vals)  # NaN marks nulls
        return np.where(ok, vals, 0).astype(np.int64), ok
    s = id_strings(col)
    numeric = pc.fill_null(pc.match_substring_regex(s, r"^-?\d+(\.\d+)?$"), False)
    num_vals = pc.cast(pc.if_else(numeric, s, pa.scalar(None, pa.string())), pa.float64())
    secs = np.nan_to_num(num_vals.to_numpy(zero_copy_only=False).astype(np.float64))
    ok = numeric.to_numpy(zero_copy_only=False).astype(bool)
    rest = ~ok
    if rest.any():
        for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            parsed = pc.strptime(s, format=fmt, unit="s", error_is_null=True)
            got = pc.is_valid(parsed).to_numpy(zero_copy_only=False) & rest
            if got.any():
                vals = pc.cast(parsed, pa.int64()).to_numpy(zero_copy_only=False)
                secs = np.where(got, np.nan_to_num(vals.astype(np.float64)), secs)
                ok |= got
                rest &= ~got
    assert len(secs) == n
    return secs.astype(np.int64), ok


def validate(
    table: pa.Table,
    catalog: Catalog,
    *,
    min_history: int = 3,
    min_timestamp: int = 0,
    max_timestamp: int | None = None,
    source: str = "<table>",
    unmapped: np.ndarray | None = None,
) -> ValidationResult:
    """Validate interactions and split them into clean rows and quarantined rows.

    Parameters
    ----------
    table
        Raw table with at least ``user_id, item_id, timestamp``.
    catalog
        The public catalog; item ids must be in it.
    min_history
        Users with fewer valid events are quarantined whole (leave-one-out needs 3).
    min_timestamp, max_timestamp
        Allowed range in seconds; ``max_timestamp`` defaults to now + 1 day.
    source
        Name used in the report and in error messages.
    unmapped
        Optional bool mask: rows whose item id had no entry in the department's item
        mapping (``fedmart data prepare --map-file``); quarantined as ``unmapped_item``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing required column(s) {', '.join(missing)}; "
            f"an interactions file needs {', '.join(REQUIRED_COLUMNS)} (optional: event)"
        )
    if max_timestamp is None:
        max_timestamp = int(time.time()) + _DAY
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    unexpected = [c for c in table.column_names if c not in known]

    n = table.num_rows
    user_s = id_strings(table["user_id"])
    item_s = id_strings(table["item_id"])
    event_s = id_strings(table["event"]) if "event" in table.column_names else None
    ts, ts_ok = _parse_timestamps(table["timestamp"])

    reason = np.full(n, -1, dtype=np.int8)  # index into REASONS, -1 = clean
    codes = {name: i for i, name in enumerate(REASONS)}

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason < 0) & mask] = codes[name]

    null_id = (~pc.is_valid(user_s).to_numpy(zero_copy_only=False)) | (
        ~pc.is_valid(item_s).to_numpy(zero_copy_only=False)
    )
    mark(null_id, "null_id")
    if unmapped is not None:
        mark(np.asarray(unmapped, dtype=bool), "unmapped_item")
    mark(~ts_ok, "bad_type")

    user_np = np.asarray(pc.fill_null(user_s, "").to_numpy(zero_copy_only=False)).astype(str)
    item_np = np.asarray(pc.fill_null(item_s, "").to_numpy(zero_copy_only=False)).astype(str)
    item_idx = catalog.index_of(item_np)
    mark(item_idx == 0, "unknown_item")
    mark((ts < min_timestamp) | (ts > max_timestamp), "timestamp_out_of_range")

    # Duplicates among rows still valid: same user, item, timestamp and event.
    valid = np.flatnonzero(reason < 0)
    if len(valid):
        _, user_code = np.unique(user_np[valid], return_inverse=True)
        if event_s is not None:
            ev_np = np.asarray(pc.fill_null(event_s, "").to_numpy(zero_copy_only=False)).astype(str)
            _, ev_code = np.unique(ev_np[valid], return_inverse=True)
        else:
            ev_code = np.zeros(len(valid), dtype=np.int64)
        keys = np.stack([user_code, item_idx[valid], ts[valid], ev_code], axis=1)
        _, first = np.unique(keys, axis=0, return_index=True)
        is_dup = np.ones(len(valid), dtype=bool)
        is_dup[first] = False
        mark(np.isin(np.arange(n), valid[is_dup]), "duplicate")

    # Users with too short a (valid) history: set aside, not quarantined.
    short_code = _SHORT_CODE
    valid = np.flatnonzero(reason < 0)
    short_rows = np.zeros(0, dtype=np.int64)
    if len(valid) and min_history > 1:
        _, inv, counts = np.unique(user_np[valid], return_inverse=True, return_counts=True)
        short_rows = valid[counts[inv] < min_history]
        reason[short_rows] = short_code

    clean_rows = np.flatnonzero(reason < 0)
    user_ids, user_code = np.unique(user_np[clean_rows], return_inverse=True)
    interactions = Interactions(
        user=user_code.astype(np.int64),
        item=item_idx[clean_rows].astype(np.int64),
        timestamp=ts[clean_rows],
        user_ids=user_ids,
        event=None
        if event_s is None
        else np.asarray(pc.fill_null(event_s, "").to_numpy(zero_copy_only=False)).astype(str)[clean_rows],
    )

    bad_rows = np.flatnonzero((reason >= 0) & (reason < short_code))
    names = list(REASONS)
    quarantine_cols = {c: pc.cast(table[c], pa.string()).take(pa.array(bad_rows)) for c in table.column_names}
    quarantine_cols["_row"] = pa.array(bad_rows, pa.int64())
    quarantine_cols["_reason"] = pa.array([names[r] for r in reason[bad_rows]], pa.string())
    quarantine = pa.table(quarantine_cols)

    problems = {}
    for name, code in codes.items():
        rows = np.flatnonzero(reason == code)
        if len(rows):
            problems[name] = {
                "count": int(len(rows)),
                "reason": REASONS[name],
                "example_rows": rows[:5].tolist(),
            }
    report = {
        "source": source,
        "catalog_version": catalog.version,
        "rows_in": int(n),
        "rows_clean": int(len(clean_rows)),
        "rows_quarantined": int(len(bad_rows)),
        "rows_short_history": int(len(short_rows)),
        "users_clean": int(len(user_ids)),
        "users_short_history": int(len(np.unique(user_np[short_rows]))),
        "min_history": int(min_history),
        "timestamp_range": [int(min_timestamp), int(max_timestamp)],
        "unexpected_columns": unexpected,
        "problems": problems,
        "short_history_note": _SHORT_NOTE,
    }
    if unexpected:
        report["unexpected_columns_note"] = (
            "not part of the schema and not used for training; they are kept in the quarantine "
            "file for quarantined rows. Rename or drop them at the source to silence this."
        )
    return ValidationResult(
        interactions=interactions, report=report, quarantine=quarantine, row_reason=reason, timestamp=ts
    )


def write_report(result: ValidationResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``quarantine.parquet`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report_path.write_text(json.dumps(result.report, indent=2) + "\n")
    q_path = out / "quarantine.parquet"
    pq.write_table(result.quarantine, q_path)
    return report_path, q_path


def usable_table(table: pa.Table, result: ValidationResult) -> pa.Table:
    """The rows that are not corrupt (clean and short-history ones), in the fedmart schema.

    Ids trimmed as validation read them, timestamps as seconds (int64): what
    ``fedmart data prepare`` writes for a node, which validates it again when it starts.
    """
    keep = pa.array(np.flatnonzero((result.row_reason < 0) | (result.row_reason == _SHORT_CODE)))
    cols = {
        "user_id": id_strings(table["user_id"]).take(keep),
        "item_id": id_strings(table["item_id"]).take(keep),
        "timestamp": pa.array(result.timestamp).take(keep),
    }
    if "event" in table.column_names:
        cols["event"] = id_strings(table["event"]).take(keep)
    return pa.table(cols)


def summary(report: dict) -> str:
    """Every count in one line: events and users kept, short histories, quarantined rows by reason.

    ``12,345 events, 1,234 users; 310 users with <3 events set aside (512 events: too short to
    train on, not an error); quarantined 2 (1 null id, 1 duplicate)``
    """
    parts = [f"{report['rows_clean']:,} events, {report['users_clean']:,} users"]
    if report.get("users_short_history"):
        parts.append(
            f"{report['users_short_history']:,} users with <{report['min_history']} events set aside "
            f"({report['rows_short_history']:,} events: too short to train on, not an error)"
        )
    parts.append(quarantined_phrase(report))
    return "; ".join(parts)


def quarantined_phrase(report: dict) -> str:
    """``quarantined 2 (1 null id, 1 duplicate)``, or ``quarantined 0``: always said, never left out."""
    detail = ", ".join(f"{p['count']:,} {_WORDS.get(name, name)}" for name, p in report["problems"].items())
    return f"quarantined {report['rows_quarantined']:,}" + (f" ({detail})" if detail else "")


def quarantine_refusal(
    report: dict, max_fraction: float, *, flag: str = "--max-quarantine-fraction", where: str | Path = ""
) -> str | None:
    """Why this data must not be trained on, in one line naming the flag that changes it; None if it may.

    Only corruption counts against ``max_fraction``; short histories never do. Data with no
    row left to train on is refused whatever the tolerance.
    """
    rows_in = max(report["rows_in"], 1)
    share = report["rows_quarantined"] / rows_in
    see = f"; see {where}" if where else ""
    if share > max_fraction:
        detail = ", ".join(f"{k}={v['count']}" for k, v in report["problems"].items())
        return (
            f"{report['source']}: {report['rows_quarantined']:,} of {report['rows_in']:,} rows quarantined "
            f"({share:.1%}: {detail}), more than {flag} {max_fraction:g} allows{see}; fix those rows, or "
            f"raise {flag} (quarantined rows are never trained on)"
        )
    if report["rows_clean"] == 0:
        return (
            f"{report['source']}: no row to train on ({report['rows_in']:,} rows: {report['rows_quarantined']:,} "
            f"quarantined, {report['rows_short_history']:,} in histories shorter than {report['min_history']} "
            f"events){see}; a node needs users with at least {report['min_history']} events"
        )
    return None
