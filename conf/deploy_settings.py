"""``fedmart coordinate``'s part of the typed settings tree: the ``deploy`` group and the whole config.

Kept apart from :mod:`conf.settings` (which it extends) because only the coordinator's command
reads it; the run config every node and the ServerApp read never carries ``deploy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conf.settings import CentralSettings, RegistrySettings, SettingsError, SimulateSettings, _choice

__all__ = ["SCHEMAS", "CoordinateSettings", "DeploySettings"]


@dataclass(frozen=True)
class DeploySettings:
    """``fedmart coordinate``'s own group (``conf/coordinate.yaml``): where the SuperLink runs."""

    certs: str = "certs"
    node_keys: str | None = None
    host: str = "127.0.0.1"
    port: int = 9092
    control_port: int = 9093
    num_nodes: int | None = None
    catalog: str | None = None
    isolation: str = "subprocess"
    startup_timeout: float = 120.0
    database: str = "outputs/superlink/state.db"
    dry_run: bool = False  # greet every node (keys, TLS, data, catalog, budget) and train nothing

    def __post_init__(self) -> None:
        for name in ("port", "control_port"):
            if not 0 < getattr(self, name) < 65536:
                raise SettingsError(f"deploy.{name} must be a TCP port, got {getattr(self, name)}")
        if self.control_port == self.port:
            raise SettingsError(f"deploy.control_port must differ from deploy.port ({self.port})")
        _choice("deploy.isolation", self.isolation, ("subprocess", "process"))


@dataclass(frozen=True)
class CoordinateSettings(SimulateSettings):
    """``conf/coordinate.yaml``: the run config plus the deployment group (which never reaches Flower).

    ``node`` is composed too but unused: in a deployment every node reads its own policy file.
    """

    deploy: DeploySettings = field(default_factory=DeploySettings)
    registry: RegistrySettings = field(default_factory=lambda: RegistrySettings(create_key=False))


# The options of the ``schema`` config group, stored in Hydra's ConfigStore (conf/typed.register).
# Here, not in conf/settings.py: the registry names every schema, the coordinator's included.
SCHEMAS: dict[str, type] = {
    "settings": SimulateSettings,  # conf/config.yaml
    "coordinate": CoordinateSettings,  # conf/coordinate.yaml (overrides config.yaml's choice)
    "central": CentralSettings,  # conf/central.yaml
}
