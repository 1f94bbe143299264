"""A node's secure-aggregation identity and policy (clients/node_policy.py): where they come from, what they refuse.

The roster and roster key come from the node's own config (``--roster``, ``--roster-key``) or from
``fedmart simulate`` (a roster made per run, one key in each simulated node's own directory),
never from the run config; a node whose policy demands the active mode refuses a semi-honest
session with ERR_POLICY and the policy key.
"""

from __future__ import annotations

import stat

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.node import node_dir_for
from clients.node_policy import ROSTER_KEY_FILE, demo_identity, policy_secagg_mod, resolve_identity
from conf.settings import NodeSettings
from federation import wire
from fedmart.simulate import make_roster_for_run
from privacy.policy import NodePolicy
from privacy.secagg import wire as secagg_wire
from privacy.secagg.roster import Roster


def _simulated_nodes(tmp_path, n: int) -> str:
    nodes = tmp_path / "nodes"
    for pid in range(n):
        d = node_dir_for(nodes, pid)
        d.mkdir(parents=True)
        (d / "node.json").write_text(f'{{"name": "dept-{pid}"}}')
    return str(nodes)


def test_simulate_makes_a_roster_and_each_nodes_own_key_per_run(tmp_path) -> None:
    nodes = _simulated_nodes(tmp_path, 3)

    path = make_roster_for_run(tmp_path, nodes, 3)
    digest = Roster.load(path).digest
    again = make_roster_for_run(tmp_path, nodes, 3)  # resume keeps them

    roster = Roster.load(again)
    assert roster.digest == digest and [m.name for m in roster.members] == ["dept-0", "dept-1", "dept-2"]
    for pid in range(3):
        key = node_dir_for(nodes, pid) / ".fedmart" / ROSTER_KEY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        node = NodeSettings(partition_id=pid)
        identity = resolve_identity(node, NodePolicy(), {"roster": str(path), "nodes-dir": nodes})
        assert identity.roster == roster and identity.fingerprint == roster.members[pid].fingerprint
        assert identity.seen.path == node_dir_for(nodes, pid) / ".fedmart" / "secagg-seen.json"


def test_a_deployed_node_reads_its_roster_and_key_from_its_own_config(tmp_path) -> None:
    nodes = _simulated_nodes(tmp_path, 2)
    roster = make_roster_for_run(tmp_path, nodes, 2)
    key = node_dir_for(nodes, 1) / ".fedmart" / ROSTER_KEY_FILE
    config = {"roster": str(roster), "roster-key": str(key), "data-dir": str(tmp_path / "data")}

    identity = resolve_identity(NodeSettings.from_node_config(config), NodePolicy(), None)

    assert identity.seen.path == tmp_path / "data" / ".fedmart" / "secagg-seen.json"
    with pytest.raises(ValueError, match="needs both --roster and --roster-key"):
        resolve_identity(NodeSettings(roster=str(roster)), NodePolicy(), None)
    assert resolve_identity(NodeSettings(), NodePolicy(), None) is None


def test_the_demo_roster_is_the_same_for_every_node_of_a_run() -> None:
    a, b = demo_identity(7, 3, 0, "active"), demo_identity(7, 3, 2, "active")

    assert a.roster == b.roster and a.fingerprint != b.fingerprint and len(a.roster) == 3
    assert demo_identity(8, 3, 0, "active").roster != a.roster


def _stage(stage: str, adversary: str) -> Message:
    record = ConfigRecord({secagg_wire.STAGE: stage, secagg_wire.ADVERSARY: adversary})
    return Message(RecordDict({secagg_wire.RECORD: record}), dst_node_id=1, message_type="train")


@pytest.mark.parametrize("stage", [secagg_wire.ADVERTISE, secagg_wire.SHARE_KEYS])
def test_an_active_policy_refuses_a_semi_honest_session_by_its_key(stage: str, flower_task) -> None:
    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    passed: list[str] = []

    def call_next(msg, ctxt):
        passed.append(str(msg.content[secagg_wire.RECORD][secagg_wire.STAGE]))
        return Message(RecordDict(), reply_to=msg)

    refused = policy_secagg_mod(lambda c: NodePolicy())(_stage(stage, "semi-honest"), ctxt, call_next)
    policy_secagg_mod(lambda c: NodePolicy())(_stage(stage, "active"), ctxt, call_next)
    lenient = NodePolicy(secagg_threat_model="semi-honest")
    policy_secagg_mod(lambda c: lenient)(_stage(stage, "semi-honest"), ctxt, call_next)

    assert refused.error.code == wire.ERR_POLICY
    assert refused.error.reason.startswith("policy.secagg_threat_model: the coordinator runs semi-honest")
    assert passed == [stage, stage]
