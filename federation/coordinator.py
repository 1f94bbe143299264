"""The coordinator's round loop over any ``flwr.serverapp.strategy`` strategy.

Flower's ``Strategy.start`` runs rounds but offers no place to persist a round,
resume after a crash, or tell a declined node from a failed one. This loop calls
the same strategy methods (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) and adds, per round:

* deterministic sampling: ``random`` is seeded from (seed, round) and the strategy
  sees nodes sorted by name, so a resumed run samples exactly as an uninterrupted one;
* reply triage: replied / declined (privacy budget) / failed / timed out / rejected
  (malformed update: NaN or Inf, wrong keys, shape or dtype);
* listeners that persist the round (metrics, checkpoint, registry, audit, display).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation import wire
from federation.contract import validate_update

__all__ = [
    "Coordinator",
    "RoundRecord",
    "RoundListener",
    "NodeInfo",
    "RunRefused",
    "discover_nodes",
    "exchange",
]

log = logging.getLogger(__name__)

_NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE


@dataclass
class NodeInfo:
    node_id: int
    name: str
    dataset_id: str = ""  # the node's random population id (never a hash of its data)
    users: int = 0
    events: int = 0
    evaluation: str = "decline"  # how the node's policy answers federated evaluation
    audit: bool = False  # whether the node's policy audits itself with canaries (never how many are in)
    canary: bool = False  # a simulated canary node of the client-level audit (clients/canary_node.py): no data
    budget_epsilon: float | None = None  # the node's own max_epsilon, as it reports it
    spent_epsilon: float = 0.0  # what its ledger held when it said hello (every run on its users)
    spent_runs: int = 0


class RunRefused(RuntimeError):
    """Every sampled node declined a round by its own policy or budget: there is nothing to train."""


@dataclass
class RoundRecord:
    round: int
    joined: list[str] = field(default_factory=list)  # nodes that connected mid-run, admitted at this round's start
    sampled: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)  # node -> reason
    failed: dict[str, str] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    # the strategy's own report of the round, if it keeps one (secure aggregation: sampled, masked,
    # unmasked, threshold, stage times and its one-line ``summary``)
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    node_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # per replied node
    federated_eval: dict[str, float] = field(default_factory=dict)
    central_eval: dict[str, float] = field(default_factory=dict)
    aggregated: bool = False
    abort_reason: str = ""
    model_version: str | None = None  # set by the registry listener
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RoundListener(Protocol):
    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord, strategy: Strategy) -> None: ...


class _SortedGrid:
    """A view of the grid whose node list is the known nodes, sorted by name."""

    def __init__(self, grid: Grid, ordered_ids: list[int]) -> None:
        self._grid = grid
        self._ids = ordered_ids

    def get_node_ids(self) -> list[int]:
        live = set(self._grid.get_node_ids())
        return [i for i in self._ids if i in live]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def discover_nodes(grid: Grid, *, expected: int, timeout: float, wait: float = 120.0) -> dict[int, NodeInfo]:
    """Wait for ``expected`` nodes, then ask each for its name and data summary.

    A node whose reply is an error (e.g. it refused to join over bad data) is left out.
    """
    t0 = time.time()
    while len(ids := list(grid.get_node_ids())) < expected and time.time() - t0 < wait:
        time.sleep(0.5)
    return _distinct_names(hello(grid, ids, timeout=timeout))


def hello(grid: Grid, ids: Iterable[int], *, timeout: float) -> dict[int, NodeInfo]:
    """Ask each of ``ids`` for its name and data summary; a node that answers with an error is left out."""
    msgs = [
        Message(RecordDict({wire.CONFIG: ConfigRecord({"q": "hello"})}), message_type=wire.QUERY_HELLO, dst_node_id=i)
        for i in ids
    ]
    nodes: dict[int, NodeInfo] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        src = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %s did not join: %s", src, reply.error.reason)
            continue
        info = reply.content["node"]
        nodes[src] = NodeInfo(
            node_id=src,
            name=str(info["name"]),
            dataset_id=str(info["dataset-id"]),
            users=int(info["users"]),
            events=int(info["events"]),
            evaluation=str(info.get("evaluation", "decline")),
            audit=bool(info.get("audit", False)),
            canary=bool(info.get("canary-node", False)),
            budget_epsilon=float(info["budget-epsilon"]) if "budget-epsilon" in info else None,
            spent_epsilon=float(info.get("spent-epsilon", 0.0)),
            spent_runs=int(info.get("spent-runs", 0)),
        )
    return nodes


def _distinct_names(nodes: dict[int, NodeInfo]) -> dict[int, NodeInfo]:
    """Nodes name themselves (``fedmart node --name``); two that say the same name get their node ids appended.

    Every record of a round (replied, dropped, ε per node) is keyed by name, so two nodes under one
    name would be merged there; the node id is what ``fedmart nodes list`` shows beside the
    registered name and key fingerprint.
    """
    counts: dict[str, int] = {}
    for info in nodes.values():
        counts[info.name] = counts.get(info.name, 0) + 1
    for info in nodes.values():
        if counts[info.name] > 1:
            log.warning(
                "%d nodes call themselves %s; this one is %s@%d in the round records (see fedmart nodes list)",
                counts[info.name],
                info.name,
                info.name,
                info.node_id,
            )
            info.name = f"{info.name}@{info.node_id}"
    return nodes


def _cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give the aggregate the global model's dtypes.

    Server optimizers compute in float64 (FedAdam's NumPy update promotes float32 weights
    with float64 scalars); the global model must stay float32, or every node would be
    sent, and every update checked against, another dtype.
    """
    from flwr.app import Array

    out = {}
    changed = False
    for key, arr in arrays.items():
        ref = reference.get(key)
        if ref is not None and arr.dtype != ref.dtype:
            out[key] = Array(arr.numpy().astype(ref.numpy().dtype))
            changed = True
        else:
            out[key] = arr
    return ArrayRecord(array_dict=out) if changed else arrays


def exchange(grid: Grid, messages: list[Message], *, timeout: float, poll: tuple[float, float] = (0.01, 0.1)):
    """``grid.send_and_receive`` with a short, growing poll interval.

    Flower 1.41's deployment Grid polls for replies every 3 s; a round has two exchanges
    (train, evaluate), so this saves up to 6 s a round there, and changes nothing else.
    The interval stops growing at 0.1 s: a reply waits at most that long to be noticed
    (a cap of 0.5 s cost up to half a second a stage), for ten cheap pulls a second.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    pause = poll[0]
    while pending:
        for r in grid.pull_messages(pending):
            pending.discard(r.metadata.reply_to_message_id)
            replies.append(r)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, poll[1])
    return replies


def _one_line(reason: str) -> str:
    """A decline's reason: policy reasons are one line already; budget reasons are JSON."""
    import json

    try:
        parsed = json.loads(reason)
    except (TypeError, ValueError):
        return reason.splitlines()[0][:300] if reason else "declined"
    if isinstance(parsed, dict):
        return f"{parsed.get('node', '?')}: {parsed.get('message', reason)}"[:300]
    return reason[:300]


def _round_seed(seed: int, server_round: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sample:{seed}:{server_round}".encode()).digest()[:8], "little")


class Coordinator:
    """Runs rounds ``start_round..num_rounds`` of ``strategy`` over ``grid``.

    Parameters
    ----------
    strategy
        Any Message-API strategy (possibly wrapped, e.g. by secure aggregation).
    grid
        Flower's grid (simulation or deployment).
    nodes
        Known nodes (from :func:`discover_nodes`), used for names and ordering.
    num_rounds, round_timeout, seed, eval_every
        Round plan. ``round_timeout`` bounds each exchange with the nodes.
    train_config
        Extra entries for every round's training ConfigRecord.
    central_eval
        Optional ``(round, arrays) -> metrics`` (simulation: the pooled test split).
    listeners
        Called after every completed round, in order.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        grid: Grid,
        nodes: dict[int, NodeInfo],
        num_rounds: int,
        round_timeout: float,
        seed: int,
        eval_every: int = 1,
        train_config: dict[str, Any] | None = None,
        central_eval: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
        listeners: Iterable[RoundListener] = (),
    ) -> None:
        if num_rounds < 1:
            raise ValueError("num_rounds must be >= 1")
        if round_timeout <= 0:
            raise ValueError("round_timeout must be > 0")
        self.strategy = strategy
        self.nodes = nodes
        self._raw_grid = grid
        self.grid = _SortedGrid(grid, sorted(nodes, key=lambda i: nodes[i].name))
        self._turned_away: set[int] = set()  # node ids that did not answer hello: said once
        self.num_rounds = num_rounds
        self.round_timeout = round_timeout
        self.seed = seed
        self.eval_every = max(1, eval_every)
        self.train_config = dict(train_config or {})
        self.central_eval = central_eval
        self.listeners = list(listeners)
        # A node's policy may refuse federated evaluation (exact metrics are a query oracle);
        # when none answers it, the exchange is not worth a round trip.
        self._federated_eval = any(n.evaluation == "plain" for n in nodes.values())
        self._canaries = {n.name for n in nodes.values() if n.canary}

    def _name(self, node_id: int) -> str:
        info = self.nodes.get(node_id)
        return info.name if info else f"node-{node_id}"

    def _check(self, reply: Message, reference: ArrayRecord) -> str:
        """Why a reply's update is unacceptable ("" if it is fine).

        A strategy that changes what a reply carries (secure aggregation: a masked vector)
        says what a valid reply looks like through ``validate_reply(reply) -> str``.
        """
        custom = getattr(self.strategy, "validate_reply", None)
        if callable(custom):
            return str(custom(reply) or "")
        if wire.ARRAYS in reply.content.array_records:
            return validate_update(reply.content[wire.ARRAYS], reference)
        return ""

    def _rejoin(self, reply: Message) -> str:
        """Why a reply is a node sitting this round out after a restart (a strategy's ``rejoin_reason``), or ""."""
        custom = getattr(self.strategy, "rejoin_reason", None)
        return str(custom(reply) or "") if callable(custom) else ""

    def _triage(self, record: RoundRecord, sent: list[Message], replies: Iterable[Message], reference: ArrayRecord):
        valid: list[Message] = []
        seen = set()
        for r in replies:
            src = r.metadata.src_node_id
            name = self._name(src)
            if r.has_error() and r.error.code == _NODE_UNAVAILABLE:
                continue  # Flower's own reply for a node that went away: a dropout, listed as timed out
            rejoin = self._rejoin(r)
            if rejoin:  # a node that restarted sits the round out (secure aggregation): a dropout, not an error
                log.info("round %d: %s %s", record.round, name, rejoin)
                continue
            seen.add(src)
            if r.has_error():
                if r.error.code in (wire.ERR_DECLINED, wire.ERR_POLICY):
                    record.declined[name] = r.error.reason or ""
                elif r.error.code == wire.ERR_BAD_UPDATE:  # the node's own guard refused its malformed update
                    record.rejected[name] = r.error.reason or "malformed update"
                    log.warning("round %d: rejected update from %s: %s", record.round, name, r.error.reason)
                else:
                    record.failed[name] = (r.error.reason or f"error code {r.error.code}").splitlines()[-1][:300]
                continue
            why = self._check(r, reference)
            if why:
                record.rejected[name] = why
                log.warning("round %d: rejected update from %s: %s", record.round, name, why)
                continue
            record.replied.append(name)
            if wire.METRICS in r.content.metric_records:
                record.node_metrics[name] = {
                    k: float(v) for k, v in r.content[wire.METRICS].items() if isinstance(v, (int, float))
                }
            valid.append(r)
        # Aggregate in a fixed order (by node name), not arrival order: float sums then
        # repeat bit for bit, which resume-equals-uninterrupted relies on.
        valid.sort(key=lambda m: self._name(m.metadata.src_node_id))
        record.timed_out = [self._name(m.metadata.dst_node_id) for m in sent if m.metadata.dst_node_id not in seen]
        return valid

    def admit_new_nodes(self, server_round: int) -> list[str]:
        """Nodes that connected since the run started (registered mid-run): asked hello, eligible from this round.

        Without this a node registered during a run would idle until the next ``fedmart coordinate``.
        Returns the names admitted; a node whose hello fails (its data, its catalog) is said once.
        """
        live = set(self._raw_grid.get_node_ids())
        new = sorted(live - set(self.nodes) - self._turned_away)
        if not new:
            return []
        found = hello(self._raw_grid, new, timeout=self.round_timeout)
        self._turned_away |= set(new) - set(found)
        if not found:
            return []
        taken = {n.name for n in self.nodes.values()}
        for info in found.values():
            if info.name in taken:  # the round records are keyed by name (see _distinct_names)
                log.warning("a new node is also called %s; it is %s@%d", info.name, info.name, info.node_id)
                info.name = f"{info.name}@{info.node_id}"
            taken.add(info.name)
            self.nodes[info.node_id] = info
            if info.canary:
                self._canaries.add(info.name)
            if info.evaluation == "plain":
                self._federated_eval = True
            name, nid = info.name, info.node_id
            log.info("node %s (node id %d) joined during the run: eligible from round %d", name, nid, server_round)
        self.grid = _SortedGrid(self._raw_grid, sorted(self.nodes, key=lambda i: self.nodes[i].name))
        return sorted(n.name for n in found.values())

    def run_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, RoundRecord]:
        record = RoundRecord(round=server_round)
        t0 = time.perf_counter()
        random.seed(_round_seed(self.seed, server_round))
        config = ConfigRecord({**self.train_config, wire.SERVER_ROUND: server_round})
        messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        record.sampled = [self._name(m.metadata.dst_node_id) for m in messages]
        t1 = time.perf_counter()
        replies = exchange(self.grid, messages, timeout=self.round_timeout) if messages else []
        t2 = time.perf_counter()
        valid = self._triage(record, messages, replies, arrays)
        if self._canaries and all(self._name(m.metadata.src_node_id) in self._canaries for m in valid):
            # Only the client-level audit's canary nodes (no data) answered: nothing to publish.
            valid = []
        new_arrays, train_metrics = (None, None)
        if valid:
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, valid)
        if new_arrays is None:
            record.abort_reason = getattr(self.strategy, "last_abort_reason", "") or (
                "no valid update" if not valid else "aggregation returned nothing"
            )
            log.warning("round %d: no aggregate (%s); the global model is unchanged", server_round, record.abort_reason)
            new_arrays = arrays
        else:
            record.aggregated = True
            new_arrays = _cast_like(new_arrays, arrays)
        record.train_metrics = {k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, (int, float))}
        report = getattr(self.strategy, "last_report", None)
        if report is not None and getattr(report, "server_round", None) == server_round and hasattr(report, "to_json"):
            record.secure_aggregation = report.to_json()
        t3 = time.perf_counter()
        if self._federated_eval and (server_round % self.eval_every == 0 or server_round == self.num_rounds):
            eval_msgs = list(self.strategy.configure_evaluate(server_round, new_arrays, ConfigRecord(), self.grid))
            eval_replies = sorted(
                (
                    r
                    for r in exchange(self.grid, eval_msgs, timeout=self.round_timeout)
                    if not r.has_error() and wire.METRICS in r.content.metric_records
                ),
                key=lambda m: self._name(m.metadata.src_node_id),  # as for training: sums repeat bit for bit
            )
            agg = self.strategy.aggregate_evaluate(server_round, eval_replies) if eval_replies else None
            record.federated_eval = {k: float(v) for k, v in (agg or {}).items() if isinstance(v, (int, float))}
        t4 = time.perf_counter()
        if self.central_eval is not None and (server_round % self.eval_every == 0 or server_round == self.num_rounds):
            record.central_eval = self.central_eval(server_round, new_arrays)
        t5 = time.perf_counter()
        record.seconds = {
            "configure": t1 - t0,
            "train_exchange": t2 - t1,
            "aggregate": t3 - t2,
            "federated_eval": t4 - t3,
            "central_eval": t5 - t4,
            "total": t5 - t0,
        }
        return new_arrays, record

    def run(self, arrays: ArrayRecord, start_round: int = 1) -> ArrayRecord:
        for server_round in range(start_round, self.num_rounds + 1):
            for listener in self.listeners:
                if hasattr(listener, "on_round_start"):
                    listener.on_round_start(server_round)
            record_joined = self.admit_new_nodes(server_round)
            arrays, record = self.run_round(server_round, arrays)
            record.joined = record_joined
            # Canary nodes (simulation's client-level audit) hold no data: a round that only they
            # answer is a refused round too.
            real = {n for n in record.sampled if n not in self._canaries}
            if real and set(record.declined) >= real:
                # Every node said no (its policy, or its budget): no round can ever succeed,
                # and nothing of this round is published.
                reasons = sorted(set(record.declined.values()))
                raise RunRefused(
                    f"round {server_round}: every node declined ({len(record.declined)} of {len(record.sampled)}): "
                    + " | ".join(_one_line(r) for r in reasons[:3])
                )
            for listener in self.listeners:
                listener.on_round_end(record, arrays, self.strategy)
        return arrays


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Server-optimizer state worth checkpointing (FedOpt's moments), following wrappers."""
    state: dict[str, Any] = {}
    obj, depth = strategy, 0
    while obj is not None and depth < 5:
        for attr in ("m_t", "v_t"):
            if getattr(obj, attr, None) is not None:
                state[f"{depth}.{attr}"] = getattr(obj, attr)
        obj = getattr(obj, "inner", None) or getattr(obj, "strategy", None)
        depth += 1
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    obj, depth = strategy, 0
    while obj is not None and depth < 5:
        for attr in ("m_t", "v_t"):
            key = f"{depth}.{attr}"
            if key in state:
                setattr(obj, attr, state[key])
        obj = getattr(obj, "inner", None) or getattr(obj, "strategy", None)
        depth += 1
