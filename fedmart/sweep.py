"""Sweep summary: after a Hydra multirun (``fedmart simulate -m ...``), one table and,
when exactly one axis varies, one plot of the selected test NDCG@10 against it.

Registered as a Hydra callback in ``conf/config.yaml``; also callable on any sweep
directory (``python -m fedmart.sweep outputs/sweep-...``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from federation.outputs import best_round, read_metrics

__all__ = ["SweepSummary", "job_row", "summarise_sweep"]

log = logging.getLogger(__name__)


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def job_row(job_dir: Path) -> dict[str, Any] | None:
    rows = read_metrics(job_dir / "metrics.jsonl")
    if not rows:
        return None
    best = best_round(rows)
    ev = (best["central_eval"] or best["federated_eval"]) if best else {}
    eps = [m.get("epsilon") for r in rows for m in r.get("node_metrics", {}).values() if m.get("epsilon") is not None]
    return {
        "job": job_dir.name,
        "overrides": _overrides(job_dir),
        "rounds": len(rows),
        "selected_round": best["round"] if best else None,
        "test_ndcg@10": ev.get("test_ndcg@10"),
        "test_hr@10": ev.get("test_hr@10"),
        "max_node_epsilon": max(eps) if eps else None,
        "declined": sum(len(r["declined"]) for r in rows),
    }


def _varying_axis(rows: list[dict[str, Any]]) -> str | None:
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r["overrides"]:
            key, _, val = o.partition("=")
            values.setdefault(key, set()).add(val)
    varying = [k for k, v in values.items() if len(v) > 1]
    return varying[0] if len(varying) == 1 else None


def _value(row: dict[str, Any], key: str) -> str:
    return next((o.partition("=")[2] for o in row["overrides"] if o.partition("=")[0] == key), "")


def summarise_sweep(sweep_dir: str | Path) -> Path | None:
    """Write ``summary.md``, ``summary.json`` (and ``summary.png``) into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = [r for d in sorted(sweep_dir.iterdir(), key=lambda p: p.name) if d.is_dir() and (r := job_row(d))]
    if not rows:
        log.warning("no finished runs under %s: no sweep summary", sweep_dir)
        return None
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")

    def f(x: Any, d: int = 4) -> str:
        return "–" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))

    lines = [
        f"# Sweep summary: {sweep_dir.name}",
        "",
        "| job | overrides | rounds | selected round | test NDCG@10 | test HR@10 | max node ε | declines |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['job']} | `{' '.join(r['overrides'])}` | {r['rounds']} | {f(r['selected_round'])} "
            f"| {f(r['test_ndcg@10'])} | {f(r['test_hr@10'])} | {f(r['max_node_epsilon'], 2)} | {r['declined']} |"
        )
    axis = _varying_axis(rows)
    if axis:
        plot = _plot(sweep_dir, rows, axis)
        if plot:
            lines += ["", f"![test NDCG@10 against {axis}]({plot.name})"]
    path = sweep_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("sweep summary: %s", path)
    return path


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], axis: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for r in rows:
        raw = _value(r, axis)
        try:
            x = float(raw)
        except ValueError:
            x = math.nan
        pts.append((x, raw, r["test_ndcg@10"] if r["test_ndcg@10"] is not None else math.nan))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if all(math.isfinite(x) for x, _, _ in pts):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o")
    else:
        ax.bar([p[1] for p in pts], [p[2] for p in pts])
    ax.set(xlabel=axis, ylabel="test NDCG@10 (selected round)", title="sweep")
    fig.tight_layout()
    path = sweep_dir / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarise_sweep(Path(config.hydra.sweep.dir))


if __name__ == "__main__":
    sys.stdout.write(f"{summarise_sweep(sys.argv[1])}\n")
