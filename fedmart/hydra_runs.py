"""The Hydra apps' shared entry: ``fedmart simulate``, ``fedmart coordinate`` and ``fedmart train-central``.

One entry (:func:`hydra_entry`) composes ``conf/<config>.yaml`` and quiets other libraries'
logs; one run flow (:func:`run_job`) saves the composed config next to the run's outputs,
or, with ``resume=outputs/<run>``, reloads the saved one with this command line's key
overrides on top (:func:`load_for_resume`), runs the job and turns a bad setting into a
one-line user error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from conf.typed import register as register_schemas
from fedmart.errors import UserError, exit_on_user_error

__all__ = ["hydra_entry", "load_for_resume", "run_job"]

# ``hydra.run.dir`` in conf/config.yaml: a resumed run writes into its own directory.
OmegaConf.register_new_resolver(
    "fedmart_run_dir", lambda resume, default: str(resume) if resume else default, replace=True
)
register_schemas()  # every conf/*.yaml starts from its typed schema (conf/settings.py)


def hydra_entry(
    config_name: str, job_name: str, job: Callable[[DictConfig], None], *, user_errors: bool = True
) -> Callable[[], None]:
    """A Hydra app over ``conf/<config_name>.yaml`` that runs ``job(cfg)``.

    ``job_name`` is Hydra's job name: the run's ``<job_name>.log`` and the name ``--help``
    shows. Hydra takes it from the task function's module, so the task says which.
    With ``user_errors`` a user error ends the command with one line and exit code 2.
    """

    def task(cfg: DictConfig) -> None:
        from fedmart.console import quiet_third_party_logs

        quiet_third_party_logs()
        job(cfg)

    task.__module__ = f"{__package__}.{job_name}"
    app = exit_on_user_error(task) if user_errors else task
    return hydra.main(version_base="1.3", config_path="../conf", config_name=config_name)(app)


def load_for_resume(run_dir: Path, overrides: list[str], *, command: str, groups_note: str = "") -> dict[str, Any]:
    """The saved config of the run, with this command line's overrides on top
    (e.g. ``federation.num_rounds=20`` extends a finished run); saved back resolved."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={run_dir}: no config.yaml there; pass the directory of an earlier `fedmart {command}`")
    base = OmegaConf.load(saved)
    extra = [o for o in overrides if not o.lstrip("+~").startswith("resume=")]
    groups = [o for o in extra if "." not in o.split("=", 1)[0]]
    if groups:
        raise UserError(f"resume takes key overrides such as federation.num_rounds=N, not {groups[0]!r}{groups_note}")
    if extra:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in extra]))
    resolved = OmegaConf.to_container(base, resolve=True)
    saved.write_text(OmegaConf.to_yaml(base, resolve=True))
    return resolved


def run_job(
    cfg: DictConfig, run: Callable[[dict[str, Any], Path], Any], *, command: str, groups_note: str = ""
) -> None:
    """Run (or resume) ``run(settings, run_dir)`` in Hydra's output directory, then say where the report is."""
    from hydra.core.hydra_config import HydraConfig

    from fedmart.console import console

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.resume:
        overrides = list(HydraConfig.get().overrides.task)
        resolved = load_for_resume(Path(str(cfg.resume)), overrides, command=command, groups_note=groups_note)
        resolved["resume"] = str(cfg.resume)
    else:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        run(resolved, run_dir)
    except ValueError as exc:  # bad settings surface as ValueError from constructors
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from exc
    console.print(f"[bold green]done[/]: report {run_dir / 'report.md'}")
