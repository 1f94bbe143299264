"""What a run leaves in ``outputs/<run>/``: metrics, checkpoints, report and plots.

Layout::

    config.yaml        the composed Hydra config (the only source of truth)
    metrics.jsonl      one line per completed round; then the nodes' privacy audit, if any
    state/             checkpoint of the last completed round (resume reads it)
    registry/          the global model of every round: signed versions (federation/registry.py)
    audit.jsonl        the hash-chained audit log
    report.md          results table (+ privacy section when DP is on)
    plots/metrics.png  metrics per round
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from federation.coordinator import RoundRecord, load_strategy_state, strategy_state
from federation.globalmodel import load_weights, save_weights

__all__ = ["RunDir", "MetricsWriter", "Checkpointer", "write_report", "plot_metrics", "read_metrics", "read_rows"]

log = logging.getLogger(__name__)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def refused(self) -> Path:
        """Written when the nodes refused the run (every node declined a round): the one-line reason."""
        return self.root / "refused.txt"


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every line of ``metrics.jsonl``: the rounds, and after them e.g. the nodes' privacy audit."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The round rows of ``metrics.jsonl``."""
    return [row for row in read_rows(path) if "round" in row]


def to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


class MetricsWriter:
    """Appends one JSON line per round (with the round's flat summary and details)."""

    def __init__(self, run: RunDir, extra: dict[str, Any] | None = None) -> None:
        self.run = run
        self.extra = extra or {}

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        line = {**record.to_json(), **self.extra}
        with self.run.metrics.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


class Checkpointer:
    """Saves the round's global model and the resume point (written last: the commit)."""

    def __init__(self, run: RunDir, *, keep_models: bool = True) -> None:
        self.run = run
        self.keep_models = keep_models

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None:
        weights = from_arrays(arrays)
        if self.keep_models:
            save_weights(weights, self.run.models / f"round-{record.round:04d}.safetensors")
        state = self.run.state
        state.mkdir(parents=True, exist_ok=True)
        tmp = state / ".global.safetensors.tmp"
        save_weights(weights, tmp)
        os.replace(tmp, state / "global.safetensors")
        opt = {f"{k}/{p}": v for k, d in strategy_state(strategy).items() for p, v in d.items()}
        if opt:
            np.savez(state / ".strategy.npz.tmp.npz", **opt)
            os.replace(state / ".strategy.npz.tmp.npz", state / "strategy.npz")
        _atomic_write(state / "progress.json", json.dumps({"round": record.round}).encode())


def load_checkpoint(run: RunDir, strategy: Strategy) -> tuple[int, ArrayRecord | None]:
    """Last completed round and its global model (0, None when there is none).

    Metrics lines of rounds after the checkpoint (a crash between the two writes)
    are dropped so the resumed run writes them again exactly once.
    """
    progress = run.state / "progress.json"
    if not progress.is_file():
        return 0, None
    last = int(json.loads(progress.read_text())["round"])
    weights = load_weights(run.state / "global.safetensors")
    if (run.state / "strategy.npz").is_file():
        with np.load(run.state / "strategy.npz") as z:
            grouped: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                head, _, param = key.partition("/")
                grouped.setdefault(head, {})[param] = z[key]
        load_strategy_state(strategy, grouped)
    lines = [m for m in read_metrics(run.metrics) if int(m["round"]) <= last]
    _atomic_write(run.metrics, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines).encode())
    return last, to_arrays(weights)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def best_round(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The round with the best validation NDCG@10 (central if present, else federated)."""

    def val(r: dict[str, Any]) -> float:
        return r["central_eval"].get("valid_ndcg@10", r["federated_eval"].get("valid_ndcg@10", -1.0))

    scored = [r for r in rows if r.get("central_eval") or r.get("federated_eval")]
    return max(scored, key=val) if scored else None


def write_report(run: RunDir, title: str, summary: dict[str, Any], privacy_section: str = "") -> Path:
    rows = read_metrics(run.metrics)
    lines = [f"# {title}", ""]
    for k, v in summary.items():
        lines.append(f"- **{k}**: {v}")
    lines += [
        "",
        "## Rounds",
        "",
        "| round | replied/sampled | declined | failed | timed out | rejected | train loss "
        "| fed NDCG@10 | central valid NDCG@10 | central test NDCG@10 | central test HR@10 | ε (max node) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = [m.get("epsilon") for m in r.get("node_metrics", {}).values() if m.get("epsilon") is not None]
        lines.append(
            f"| {r['round']} | {len(r['replied'])}/{len(r['sampled'])} | {len(r['declined'])} | {len(r['failed'])} "
            f"| {len(r['timed_out'])} | {len(r['rejected'])} | {_fmt(r['train_metrics'].get('train_loss'))} "
            f"| {_fmt(r['federated_eval'].get('test_ndcg@10'))} | {_fmt(r['central_eval'].get('valid_ndcg@10'))} "
            f"| {_fmt(r['central_eval'].get('test_ndcg@10'))} | {_fmt(r['central_eval'].get('test_hr@10'))} "
            f"| {_fmt(max(eps) if eps else None, 3)} | {r['seconds'].get('total', 0):.1f} |"
        )
    best = best_round(rows)
    if best:
        ev = best["central_eval"] or best["federated_eval"]
        lines += [
            "",
            f"**Selected round (best validation NDCG@10): {best['round']}** — test NDCG@10 "
            f"{_fmt(ev.get('test_ndcg@10'))}, HR@10 {_fmt(ev.get('test_hr@10'))} "
            f"({'central evaluation on the pooled split' if best['central_eval'] else 'federated evaluation'}).",
        ]
    events = [(r["round"], kind, n, why) for r in rows for kind in ("declined", "failed", "rejected")
              for n, why in r[kind].items()]  # fmt: skip
    if events:
        lines += ["", "## Nodes that did not contribute", "", "| round | what | node | reason |", "|---|---|---|---|"]
        lines += [f"| {rd} | {kind} | {n} | {str(why)[:160]} |" for rd, kind, n, why in events]
    if privacy_section:
        lines += ["", privacy_section]
    if (run.plots / "metrics.png").is_file():
        lines += ["", "![metrics per round](plots/metrics.png)"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_metrics(run: RunDir) -> Path | None:
    rows = read_metrics(run.metrics)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(rounds, [r["train_metrics"].get("train_loss", np.nan) for r in rows], marker="o")
    axes[0].set(title="train loss (weighted over nodes)", xlabel="round")
    for key, label in (("central_eval", "central"), ("federated_eval", "federated")):
        vals = [r[key].get("test_ndcg@10", np.nan) for r in rows]
        if not all(np.isnan(vals)):
            axes[1].plot(rounds, vals, marker="o", label=f"{label} test NDCG@10")
    axes[1].set(title="NDCG@10", xlabel="round")
    axes[1].legend()
    fig.tight_layout()
    run.plots.mkdir(parents=True, exist_ok=True)
    path = run.plots / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
