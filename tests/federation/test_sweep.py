"""The sweep summary over run directories shaped like a Hydra multirun's."""

from __future__ import annotations

import json

from fedmart.sweep import summarise_sweep


def _job(root, num, nm, ndcg):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- privacy=dp\n- privacy.noise_multiplier={nm}\n")
    rows = []
    for rnd, v in ((1, ndcg / 2), (2, ndcg)):
        rows.append(
            {
                "round": rnd,
                "central_eval": {"valid_ndcg@10": v, "test_ndcg@10": v, "test_hr@10": 2 * v},
                "federated_eval": {},
                "node_metrics": {"a": {"epsilon": 1.0 / nm * rnd}},
                "declined": {},
            }
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_table_and_plot(tmp_path):
    for i, (nm, ndcg) in enumerate([(0.6, 0.10), (1.0, 0.08), (2.0, 0.05)]):
        _job(tmp_path, i, nm, ndcg)
    path = summarise_sweep(tmp_path)
    text = path.read_text()
    assert text.count("| 0 |") + text.count("| 1 |") + text.count("| 2 |") >= 3
    assert "0.1000" in text and "0.0500" in text
    assert (tmp_path / "summary.png").is_file(), "one axis varies: a plot is expected"
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["selected_round"] for r in rows] == [2, 2, 2]
    assert rows[0]["max_node_epsilon"] == 2 / 0.6


def test_empty_sweep_writes_nothing(tmp_path):
    (tmp_path / "0").mkdir()
    assert summarise_sweep(tmp_path) is None
