"""The ledger's pins (issue 13): delta and accountant fixed at the first spend, never read otherwise;
a version-1 ledger (keyed by a content hash, without pins) is adopted with its spend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.accounting import epsilon
from privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-4
SPEND = (1.0, 0.01, 200)  # (noise_multiplier, sample_rate, steps)


def _ledger(tmp_path: Path, population_id: str = "pop-1") -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "node" / ".fedmart" / "privacy-ledger.json", population_id=population_id)


def _pinned(tmp_path: Path) -> PrivacyLedger:
    led = _ledger(tmp_path)
    led.record(*SPEND, round=1, run="r1", training_id="t1", delta=DELTA, accountant="rdp")
    return led


def test_a_new_ledger_has_no_pins_until_its_first_spend(tmp_path):
    led = _ledger(tmp_path)
    assert (led.pinned_delta, led.pinned_accountant) == (None, None)

    led.record(*SPEND, round=1, run="r1", delta=DELTA, accountant="rdp")

    assert (led.pinned_delta, led.pinned_accountant) == (DELTA, "rdp")
    assert json.loads(led.path.read_text())["pinned"] == {"delta": DELTA, "accountant": "rdp"}


def test_the_pins_survive_a_restart(tmp_path):
    path = _pinned(tmp_path).path

    again = PrivacyLedger(path, population_id="pop-1")

    assert (again.pinned_delta, again.pinned_accountant) == (DELTA, "rdp")
    assert again.epsilon(DELTA) == epsilon([SPEND], delta=DELTA) > 0


@pytest.mark.parametrize("other", [0.9, 2 * DELTA, DELTA / 2])
def test_a_pinned_ledger_never_reads_at_another_delta(tmp_path, other):
    led = _pinned(tmp_path)

    with pytest.raises(LedgerError, match="pinned to delta"):
        led.epsilon(other)
    with pytest.raises(LedgerError, match="pinned to delta"):
        led.epsilon_after(*SPEND, delta=other)
    with pytest.raises(LedgerError, match="pinned to delta"):
        led.check(max_epsilon=10.0, noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=other)


def test_a_spend_at_another_delta_or_accountant_is_refused_and_changes_nothing(tmp_path):
    led = _pinned(tmp_path)
    before = led.path.read_bytes()

    with pytest.raises(LedgerError, match="pinned to delta"):
        led.record(*SPEND, round=2, run="r1", delta=0.9, accountant="rdp")
    with pytest.raises(LedgerError, match="pinned to the 'rdp' accountant"):
        led.record(*SPEND, round=2, run="r1", delta=DELTA, accountant="prv")

    assert led.path.read_bytes() == before
    assert PrivacyLedger(led.path, population_id="pop-1").history == [SPEND]


def test_a_pinned_ledger_never_reads_with_another_accountant(tmp_path):
    led = _pinned(tmp_path)

    with pytest.raises(LedgerError, match="not 'prv'"):
        led.epsilon(DELTA, accountant="prv")
    with pytest.raises(LedgerError, match="not 'prv'"):
        led.check(max_epsilon=10.0, noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=DELTA, accountant="prv")


def test_a_pin_written_by_another_process_holds_for_a_ledger_opened_before_it(tmp_path):
    early = _ledger(tmp_path)  # opened before any spend: no pins in memory
    _pinned(tmp_path)  # another process (a second worker of the node) records first

    with pytest.raises(LedgerError, match="pinned to delta"):
        early.check(max_epsilon=10.0, noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=0.9)
    with pytest.raises(LedgerError, match="pinned to delta"):
        early.record(*SPEND, round=2, run="r1", delta=0.9, accountant="rdp")


def test_at_its_pins_the_ledger_checks_and_records_as_before(tmp_path):
    led = _pinned(tmp_path)

    decision = led.check(max_epsilon=100.0, noise_multiplier=1.0, sample_rate=0.01, steps=200, delta=DELTA)
    led.record(*SPEND, round=2, run="r1", delta=DELTA, accountant="rdp")

    assert decision.allowed and decision.epsilon_now == epsilon([SPEND], delta=DELTA)
    assert led.epsilon(DELTA) == pytest.approx(decision.epsilon_after)


def _version_1(path: Path, entries: list[dict]) -> None:
    """A ledger as fedmart wrote it before populations: keyed by a content hash, no pins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "fedmart-privacy-ledger",
        "version": 1,
        "dataset_id": "3f2a9c0d11e4b7a8",
        "accountant_history_fields": ["noise_multiplier", "sample_rate", "steps"],
        "entries": entries,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")


OLD_ENTRIES = [
    {"run": "old", "round": r, "training_id": f"t{r}", "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 50,
     "recorded_at": 1.7e9 + r}
    for r in (1, 2, 3)
]  # fmt: skip


def test_a_version_1_ledger_is_adopted_with_its_spend(tmp_path):
    path = tmp_path / "node" / ".fedmart" / "privacy-ledger.json"
    _version_1(path, OLD_ENTRIES)

    led = PrivacyLedger(path, population_id="pop-1")

    old = [(1.1, 0.02, 50)] * 3
    assert led.history == old and (led.pinned_delta, led.pinned_accountant) == (None, None)
    assert led.epsilon(DELTA) == epsilon(old, delta=DELTA) > 0
    decision = led.check(max_epsilon=100.0, noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=DELTA)
    assert decision.epsilon_now == led.epsilon(DELTA), "the adopted spend counts against the budget"


def test_the_first_spend_after_adoption_pins_and_writes_version_2_for_the_population(tmp_path):
    path = tmp_path / "node" / ".fedmart" / "privacy-ledger.json"
    _version_1(path, OLD_ENTRIES)

    PrivacyLedger(path, population_id="pop-1").record(*SPEND, round=1, run="new", delta=DELTA, accountant="rdp")

    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["population_id"] == "pop-1"
    assert data["pinned"] == {"delta": DELTA, "accountant": "rdp"}
    assert [(e["run"], e["round"]) for e in data["entries"]] == [("old", 1), ("old", 2), ("old", 3), ("new", 1)]
    with pytest.raises(LedgerError, match="belongs to population 'pop-1'"):
        PrivacyLedger(path, population_id="pop-2")
