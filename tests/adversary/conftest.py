"""A scripted dishonest coordinator, run once against real fedmart nodes in Flower's simulation engine.

The nodes are the real ClientApp (``clients.app.build_client_app``) on a tiny world written to
disk as ``fedmart simulate`` writes it (three silos), with one of the node policies below. The
coordinator is a real ``ServerApp`` whose main function runs one attack after another over
the real grid, with fedmart's own coordinator parts (:class:`~federation.coordinator.Coordinator`,
:func:`~federation.server.make_strategy`, secure aggregation). It forges only what an attacker
forges: the ``request.*`` keys of a TRAIN message, a round asked again, a plain TRAIN message,
an evaluate message with weights of its choosing. Every reply is recorded (error code and
reason, metrics, the unmasked aggregate) and the tests in this folder assert on the record.

One Ray start costs ~20 s, so the attacks share simulations: every attack on private nodes runs
in one (``attacks``), the attacks that need nodes allowing training without DP in a second
(``open_attacks``, ``conf/node/open.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from conf.settings import SimSettings, SimulateSettings
from conf.typed import build
from federation import wire
from federation.aggregation import with_holders
from federation.catalog import Catalog
from federation.coordinator import Coordinator, NodeInfo, discover_nodes, exchange
from federation.globalmodel import build_model, get_weights
from federation.outputs import from_arrays, to_arrays
from federation.runconfig import flatten
from federation.server import make_strategy, training_request
from privacy.policy import TrainingRequest

NUM_NODES = 3
# The nodes' own policy: fedmart's default (DP and secure aggregation required, evaluation
# declined, max_epsilon 10, delta 1/(10 x users)) narrowed to one accountant and a floor on sigma.
NODE_POLICY: dict[str, Any] = {"accountants": ["rdp"], "min_noise_multiplier": 0.5}
# conf/node/open.yaml: training without DP and unmasked, evaluation in the clear.
OPEN_POLICY: dict[str, Any] = {"require_dp": False, "require_secagg": False, "evaluation": "plain"}
# The tiny world: 600 users, 150 items, 3 departments; a 16-wide one-head model, batch 32.
WORLD: dict[str, Any] = {
    "data": {
        "max_len": 20,
        "synthetic": {"num_users": 600, "num_items": 150, "num_departments": 3, "num_merchants": 6},
    },
    "model": {"hidden": 16, "heads": 1},
    "train": {"batch_size": 32},
    # The honest coordinator's request: DP-SGD at sigma 1 (above the nodes' floor), 3 steps a round.
    "privacy": {"mode": "dp", "noise_multiplier": 1.0, "accountant": "rdp"},
    "federation": {"num_rounds": 1, "local_steps": 3, "central_eval": False, "round_timeout": 120.0},
}


class TappedGrid:
    """The real grid, with every TRAIN instruction and its reply written down.

    The secure-aggregation key and unmask stages pass through unrecorded (they carry no
    ``config`` record), and so does any federated evaluation the coordinator runs.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._asked: dict[str, Message] = {}
        self.replies: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        for mid, msg in zip(ids, messages, strict=True):
            is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
            if is_train and msg.has_content() and wire.CONFIG in msg.content.config_records:
                self._asked[mid] = msg
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(self._grid.pull_messages(message_ids))
        self.replies += [r for r in out if r.metadata.reply_to_message_id in self._asked]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _reply_summary(reply: Message) -> dict[str, Any]:
    """What the coordinator learns from one reply: an error code and reason, or its plaintext metrics."""
    if reply.has_error():
        return {"code": int(reply.error.code), "reason": reply.error.reason or "", "metrics": {}}
    metrics = {
        k: float(v)
        for rec in reply.content.metric_records.values()
        for k, v in rec.items()
        if isinstance(v, (int, float))
    }
    return {"code": None, "reason": "", "metrics": metrics, "records": sorted(reply.content.keys())}


class DishonestCoordinator:
    """The attacker: fedmart's own coordinator parts, with the messages it chooses to send."""

    def __init__(self, grid: Grid, settings: SimulateSettings, nodes: dict[int, NodeInfo]) -> None:
        self.grid = grid
        self.settings = settings
        self.nodes = nodes
        self.honest = training_request(settings)  # what fedmart's coordinator would ask

    def name(self, node_id: int) -> str:
        return self.nodes[node_id].name

    def train(
        self,
        arrays: ArrayRecord,
        request: dict[str, Any],
        *,
        run: str,
        server_round: int = 1,
        secure: bool = True,
        item_rows: str | None = None,
    ) -> dict[str, Any]:
        """One round of TRAIN messages carrying ``request`` in their config, through a fresh strategy.

        A fresh strategy per call is a restarted coordinator: a new secure-aggregation session
        for every ask, whatever round it names. ``item_rows="mean"`` aggregates with plain
        FedAvg, so the unmasked average (holder array included) is returned as it came out of
        the secure sum.
        """
        fed = self.settings.federation
        if item_rows is not None:
            fed = dataclasses.replace(fed, item_rows=item_rows)
        secagg = self.settings.secagg if secure else dataclasses.replace(self.settings.secagg, enabled=False)
        tap = TappedGrid(self.grid)
        coordinator = Coordinator(
            strategy=make_strategy(fed, len(self.nodes), secagg),
            grid=tap,
            nodes=self.nodes,
            num_rounds=max(server_round, 1),
            round_timeout=fed.round_timeout,
            seed=self.settings.seed,
            train_config={wire.RUN: run, **request},
        )
        new_arrays, record = coordinator.run_round(server_round, arrays)
        return {
            "run": run,
            "round": server_round,
            "sent": dict(coordinator.train_config),
            "record": record.to_json(),
            "replies": {self.name(r.metadata.src_node_id): _reply_summary(r) for r in tap.replies},
            "aggregate": from_arrays(new_arrays) if record.aggregated else None,
        }

    def evaluate(self, arrays: ArrayRecord) -> dict[str, Any]:
        """EVALUATE messages with weights of the attacker's choosing, straight to every node."""
        messages = [
            Message(
                RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}),
                dst_node_id=node_id,
                message_type=MessageType.EVALUATE,
            )
            for node_id in sorted(self.nodes)
        ]
        replies = exchange(self.grid, messages, timeout=self.settings.federation.round_timeout)
        return {"replies": {self.name(r.metadata.src_node_id): _reply_summary(r) for r in replies}}


def _request(base: TrainingRequest, **changes: Any) -> dict[str, Any]:
    return dataclasses.replace(base, **changes).to_config()


def _begin(grid: Grid, settings: SimulateSettings, box: dict[str, Any]) -> tuple[DishonestCoordinator, Any]:
    """Discover the nodes as fedmart's coordinator does; the attacker and the initial global model."""
    nodes = discover_nodes(grid, expected=NUM_NODES, timeout=60.0)
    box["hello"] = {n.name: dataclasses.asdict(n) for n in nodes.values()}
    catalog = Catalog.load(box["sim"]["catalog"])
    return DishonestCoordinator(grid, settings, nodes), build_model(
        catalog, settings.model, settings.data.max_len, seed=settings.seed
    )


def run_attacks(grid: Grid, settings: SimulateSettings, box: dict[str, Any]) -> None:
    """The script against private nodes: every attack in turn, each recorded under its name in ``box``."""
    attacker, model = _begin(grid, settings, box)
    initial = with_holders(to_arrays(get_weights(model)))
    honest = attacker.honest
    probe = _oracle_weights(model)

    attacks: dict[str, Callable[[], dict[str, Any]]] = {
        # delta = 0.9 (the first spend these nodes ever make): the request has no delta field,
        # so the attacker adds one; the nodes' own delta must be the one used and pinned.
        "delta": lambda: attacker.train(initial, {**honest.to_config(), "request.delta": 0.9}, run="adv-delta"),
        "honest": lambda: attacker.train(initial, honest.to_config(), run="adv-honest"),
        "dp_off": lambda: attacker.train(initial, _request(honest, mode="off", noise_multiplier=None), run="adv-off"),
        "accountant": lambda: attacker.train(initial, _request(honest, accountant="prv"), run="adv-prv"),
        "no_poisson": lambda: attacker.train(initial, _request(honest, poisson_sampling=False), run="adv-shuffle"),
        "low_sigma": lambda: attacker.train(initial, _request(honest, noise_multiplier=0.1), run="adv-sigma"),
        "plain_train": lambda: attacker.train(initial, honest.to_config(), run="adv-plain", secure=False),
        "holders": lambda: attacker.train(initial, honest.to_config(), run="adv-holders", item_rows="mean"),
        "evaluate": lambda: attacker.evaluate(probe),
        # The same probe in a valid, private, secure TRAIN message: what comes back in the clear?
        "loss_oracle": lambda: attacker.train(with_holders(probe), honest.to_config(), run="adv-loss"),
    }
    for name, attack in attacks.items():
        box[name] = _recorded(name, attack, box)
    # Re-release: a restarted coordinator asks round 1 of one run twice, with the same global weights.
    box["replay"] = [
        _recorded("replay", lambda: attacker.train(initial, honest.to_config(), run="adv-replay"), box)
        for _ in range(2)
    ]


def run_attacks_on_open_nodes(grid: Grid, settings: SimulateSettings, box: dict[str, Any]) -> None:
    """The script against nodes whose policy allows training without DP (``conf/node/open.yaml``).

    Without DP a node's update is a function of the global weights and the run seed's round
    seed, and its holder set is the items in its data: the re-release and holder attacks as
    the issue found them.
    """
    attacker, model = _begin(grid, settings, box)
    initial = with_holders(to_arrays(get_weights(model)))
    off = _request(attacker.honest, mode="off", noise_multiplier=None)
    # (round 2: a node without DP declines an update it already released, and round 1's is the replay's)
    box["holders"] = _recorded(
        "holders", lambda: attacker.train(initial, off, run="open-holders", server_round=2, item_rows="mean"), box
    )
    # a restarted coordinator asks round 1 of one run again, with the same global weights ...
    box["replay"] = [
        _recorded("replay", lambda: attacker.train(initial, off, run="open-replay"), box) for _ in range(2)
    ]
    # ... or asks it under another run's name: the round seed, hence the update, is the same
    box["renamed"] = _recorded("renamed", lambda: attacker.train(initial, off, run="open-replay-2"), box)


def _recorded(name: str, attack: Callable[[], dict[str, Any]], box: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = attack()
    except Exception:  # the test that reads this attack shows the traceback
        box.setdefault("errors", {})[name] = traceback.format_exc()
        out = {}
    box.setdefault("seconds", {})[name] = time.perf_counter() - t0
    return out


def _oracle_weights(model) -> ArrayRecord:
    """A probe an attacker would choose: the global model with one item's score pushed to the top."""
    weights = get_weights(model)
    weights["head.bias"] = weights["head.bias"].copy()
    weights["head.bias"][1] += 50.0
    return to_arrays(weights)


def _simulate(root: Path, policy: dict[str, Any], script, world: dict[str, Any]) -> SimpleNamespace:
    """One Flower simulation: the real ClientApp with ``policy`` on three nodes, ``script`` as the ServerApp."""
    from flwr.simulation import run_simulation

    from clients.app import build_client_app
    from fedmart.simulate import make_roster_for_run, prepare

    settings = SimulateSettings.from_dict(world)
    box: dict[str, Any] = {"sim": prepare(settings.to_dict(), root)}
    # the nodes' own secure-aggregation roster and keys, made before the coordinator starts, as
    # `fedmart simulate` makes them (the active mode, the default, needs them)
    nodes_dir = box["sim"]["nodes-dir"]
    identity = {"roster": str(make_roster_for_run(root, nodes_dir, NUM_NODES)), "nodes-dir": nodes_dir}
    run_config = flatten(settings.request().with_sim(build(SimSettings, box["sim"])).to_dict())
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        script(grid, settings, box)

    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=build_client_app(run_config, node_policy=policy, node_identity=identity),
        num_supernodes=NUM_NODES,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "log_to_driver": False},
        },
    )
    box.setdefault("seconds", {})["simulation"] = time.perf_counter() - t0
    node_dirs = {}
    for node_dir in sorted(Path(box["sim"]["nodes-dir"]).iterdir()):
        node_dirs[json.loads((node_dir / "node.json").read_text())["name"]] = node_dir
    return SimpleNamespace(box=box, run_config=run_config, node_dirs=node_dirs, settings=settings, policy=policy)


@pytest.fixture(scope="session")
def attacks(tmp_path_factory) -> SimpleNamespace:
    """The dishonest coordinator against three private nodes (:data:`NODE_POLICY`); the record of every attack."""
    return _simulate(tmp_path_factory.mktemp("adversary"), NODE_POLICY, run_attacks, WORLD)


@pytest.fixture(scope="session")
def open_attacks(tmp_path_factory) -> SimpleNamespace:
    """The dishonest coordinator against three nodes that allow training without DP (:data:`OPEN_POLICY`)."""
    # Dirichlet silos of a long catalog: nodes of different sizes whose item sets overlap in part
    # (department silos hold disjoint sets: a department's items are its own).
    data = {**WORLD["data"], "synthetic": {**WORLD["data"]["synthetic"], "num_items": 1500}}
    world = {**WORLD, "data": data, "partition": {"scheme": "dirichlet", "num_partitions": NUM_NODES, "alpha": 0.5}}
    return _simulate(tmp_path_factory.mktemp("adversary-open"), OPEN_POLICY, run_attacks_on_open_nodes, world)
