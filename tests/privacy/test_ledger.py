"""Privacy ledger: persisted, crash-safe, idempotent per training, Opacus's epsilon, budget check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import epsilon, epsilon_after
from privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-4
ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a node process that starts, or dies)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _ledger(tmp_path: Path, population_id: str = "ds-1") -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "node" / "ledger.json", population_id=population_id)


def test_a_new_ledger_is_written_to_disk_at_once(tmp_path):
    led = _ledger(tmp_path)
    data = json.loads(led.path.read_text())
    assert data["population_id"] == "ds-1" and data["entries"] == []
    assert led.epsilon(DELTA) == 0.0 and led.history == []


def test_the_ledger_survives_a_process_restart(tmp_path):
    path = tmp_path / "ledger.json"
    write = _run(f"""
        from privacy.ledger import PrivacyLedger
        led = PrivacyLedger({str(path)!r}, population_id="ds-1")
        led.record(1.1, 0.01, 300, round=1, run="r1", training_id="t1")
        led.record(0.9, 0.02, 150, round=2, run="r1", training_id="t2")
    """)
    assert write.returncode == 0, write.stderr
    read = _run(f"""
        from privacy.ledger import PrivacyLedger
        led = PrivacyLedger({str(path)!r}, population_id="ds-1")
        print(led.history)
    """)
    assert read.returncode == 0, read.stderr
    history = [(1.1, 0.01, 300), (0.9, 0.02, 150)]
    assert read.stdout.strip() == str(history)
    assert PrivacyLedger(path, population_id="ds-1").epsilon(DELTA) == epsilon(history, delta=DELTA) > 0


def test_a_failed_replace_leaves_the_old_ledger_intact(tmp_path, monkeypatch):
    led = _ledger(tmp_path)
    led.record(1.0, 0.01, 200, round=1, run="r1", training_id="t1")
    before_bytes, before_eps = led.path.read_bytes(), led.epsilon(DELTA)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        led.record(1.0, 0.01, 200, round=2, run="r1", training_id="t2")
    monkeypatch.undo()
    assert led.path.read_bytes() == before_bytes
    assert [p.name for p in led.path.parent.iterdir() if p.suffix == ".tmp"] == []  # temp file cleaned up
    again = PrivacyLedger(led.path, population_id="ds-1")
    assert again.epsilon(DELTA) == before_eps
    assert again.record(1.0, 0.01, 200, round=2, run="r1", training_id="t2")  # retry works
    assert again.epsilon(DELTA) > before_eps


def test_a_process_killed_between_temp_write_and_replace_never_lowers_the_spend(tmp_path):
    led = _ledger(tmp_path)
    led.record(1.0, 0.01, 200, round=1, run="r1", training_id="t1")
    before_bytes, before_eps = led.path.read_bytes(), led.epsilon(DELTA)
    crash = _run(f"""
        import os, signal
        from privacy.ledger import PrivacyLedger
        led = PrivacyLedger({str(led.path)!r}, population_id="ds-1")
        def die(src, dst):  # the temp file is written and fsynced; the process dies here
            assert os.path.getsize(src) > 0
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = die
        led.record(1.0, 0.01, 500, round=2, run="r1", training_id="t2")
    """)
    assert crash.returncode == -9, crash.stderr
    assert led.path.read_bytes() == before_bytes  # the old ledger, whole
    after = PrivacyLedger(led.path, population_id="ds-1")  # a leftover temp file does not confuse it
    assert after.epsilon(DELTA) == before_eps
    after.record(1.0, 0.01, 500, round=2, run="r1", training_id="t2")
    assert after.epsilon(DELTA) > before_eps


def test_re_recording_the_same_training_does_not_double_count(tmp_path):
    led = _ledger(tmp_path)
    assert led.record(1.0, 0.01, 100, round=3, run="r1", training_id="t3") is True
    # the coordinator restarts; the node re-sends the reply it recorded and records again
    restarted = PrivacyLedger(led.path, population_id="ds-1")
    assert restarted.record(1.0, 0.01, 100, round=3, run="r1", training_id="t3") is False
    assert restarted.history == [(1.0, 0.01, 100)]


def test_a_genuinely_new_training_is_always_recorded(tmp_path):
    led = _ledger(tmp_path)
    led.record(1.0, 0.01, 100, round=3, run="r1", training_id="t3")
    # the same round trained again (fresh noise): a second release, a second spend
    assert led.record(1.0, 0.01, 100, round=3, run="r1", training_id="t3-retrain") is True
    # without a training id every record is a new training
    assert led.record(1.0, 0.01, 100, round=4, run="r1") is True
    assert led.record(1.0, 0.01, 100, round=4, run="r1") is True
    assert len(led.history) == 4
    assert [e.training_id for e in led.entries_for(run="r1", round=3)] == ["t3", "t3-retrain"]


def test_the_same_training_with_other_parameters_is_an_error(tmp_path):
    led = _ledger(tmp_path)
    led.record(1.0, 0.01, 100, round=1, run="r1", training_id="t1")
    with pytest.raises(LedgerError, match="already recorded"):
        led.record(1.0, 0.01, 101, round=1, run="r1", training_id="t1")


def test_a_ledger_for_another_dataset_is_an_error(tmp_path):
    _ledger(tmp_path, "ds-1").record(1.0, 0.01, 100, round=1, run="r1")
    with pytest.raises(LedgerError, match="belongs to population 'ds-1'"):
        _ledger(tmp_path, "ds-2")


def test_an_unreadable_ledger_is_an_error_not_an_empty_one(tmp_path):
    led = _ledger(tmp_path)
    led.path.write_text('{"format": "fedmart-privacy-ledger", "entries": [')  # torn by hand
    with pytest.raises(LedgerError, match="refusing to treat it as empty"):
        PrivacyLedger(led.path, population_id="ds-1")


def test_concurrent_writers_lose_no_spend(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, population_id="ds-1")
    code = """
        import sys
        from privacy.ledger import PrivacyLedger
        led = PrivacyLedger({path!r}, population_id="ds-1")
        for i in range(15):
            led.record(1.0, 0.01, 10, round=i, run=sys.argv[1] if len(sys.argv) > 1 else "{run}")
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code.format(path=str(path), run=run))],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for run in ("a", "b")
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert len(PrivacyLedger(path, population_id="ds-1").history) == 30


# ---- epsilon: the Opacus accountants on the same history ------------------------------

HISTORY = [(1.1, 0.01, 300), (0.8, 0.02, 120), (1.1, 0.01, 300)]


@pytest.mark.parametrize(("name", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_ledger_epsilon_equals_opacus_accountant_on_the_same_history(tmp_path, name, cls):
    led = _ledger(tmp_path)
    for i, (sigma, q, steps) in enumerate(HISTORY):
        led.record(sigma, q, steps, round=i, run="r1")
    acc = cls()
    acc.history = list(HISTORY)
    assert led.epsilon(DELTA, accountant=name) == acc.get_epsilon(delta=DELTA)
    assert epsilon(HISTORY, delta=DELTA, accountant=name) == acc.get_epsilon(delta=DELTA)


def test_ledger_epsilon_equals_an_accountant_that_took_the_steps(tmp_path):
    led = _ledger(tmp_path)
    acc = RDPAccountant()
    for _ in range(250):
        acc.step(noise_multiplier=1.2, sample_rate=0.02)
    led.record(1.2, 0.02, 250, round=1, run="r1")
    assert led.epsilon(DELTA) == acc.get_epsilon(delta=DELTA)


def test_prv_is_tighter_than_rdp():
    assert epsilon(HISTORY, delta=DELTA, accountant="prv") < epsilon(HISTORY, delta=DELTA, accountant="rdp")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_after_is_the_accounting_function_on_the_ledgers_history(tmp_path, monkeypatch, accountant):
    import privacy.ledger

    led = _ledger(tmp_path)
    led.record(1.1, 0.05, 30, round=1, run="r1")
    led.record(0.9, 0.02, 70, round=2, run="r1")
    want = epsilon_after(
        led.history, noise_multiplier=1.3, sample_rate=0.04, steps=25, delta=DELTA, accountant=accountant
    )

    got = led.epsilon_after(1.3, 0.04, 25, delta=DELTA, accountant=accountant)

    assert got == want == epsilon([*led.history, (1.3, 0.04, 25)], delta=DELTA, accountant=accountant)
    calls = []
    monkeypatch.setattr(privacy.ledger, "epsilon_after", lambda *a, **k: calls.append((a, k)) or 7.0)
    assert led.epsilon_after(1.3, 0.04, 25, delta=DELTA) == 7.0 and len(calls) == 1  # one implementation


# ---- budget check -----------------------------------------------------------------------


def test_check_refuses_the_round_that_would_cross_max_epsilon(tmp_path):
    led = _ledger(tmp_path)
    one_round = {"noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 50}
    eps = [epsilon([(1.0, 0.02, 50)] * k, delta=DELTA) for k in (1, 2, 3)]
    max_epsilon = (eps[1] + eps[2]) / 2  # two rounds fit, the third would cross it
    for r in (1, 2):
        decision = led.check(max_epsilon=max_epsilon, delta=DELTA, **one_round)
        assert decision.allowed and decision.code == "ok"
        assert decision.epsilon_after == pytest.approx(eps[r - 1])
        led.record(1.0, 0.02, 50, round=r, run="r1")
    decision = led.check(max_epsilon=max_epsilon, delta=DELTA, **one_round)
    assert not decision.allowed
    assert decision.code == "budget_exceeded" and "max_epsilon" in decision.reason
    assert decision.epsilon_now == pytest.approx(eps[1])
    assert decision.epsilon_after == pytest.approx(eps[2])
    assert decision.epsilon_after > max_epsilon
    # a smaller training may still fit
    assert led.check(max_epsilon=max_epsilon, noise_multiplier=1.0, sample_rate=0.02, steps=1, delta=DELTA).allowed


def test_check_reports_an_exhausted_budget(tmp_path):
    led = _ledger(tmp_path)
    led.record(0.6, 0.1, 400, round=1, run="r1")
    decision = led.check(max_epsilon=1.0, noise_multiplier=1.0, sample_rate=0.01, steps=1, delta=DELTA)
    assert (decision.allowed, decision.code) == (False, "budget_exhausted")
    assert led.check(max_epsilon=None, noise_multiplier=1.0, sample_rate=0.01, steps=1, delta=DELTA).allowed


def test_check_sees_spend_recorded_by_another_process(tmp_path):
    a = _ledger(tmp_path)
    b = _ledger(tmp_path)
    b.record(0.6, 0.1, 400, round=1, run="r1")
    assert not a.check(max_epsilon=1.0, noise_multiplier=1.0, sample_rate=0.01, steps=1, delta=DELTA).allowed
