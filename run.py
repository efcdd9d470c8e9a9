"""Evaluate one cell (backbone x method x retention x tasks) through lmms-eval.

    python run.py                                   # trained toy LLaVA-OV + the synthetic test split (200 videos), offline, ~1 min on CPU
    python run.py method=fastv retention=0.25
    python run.py method=sharp retention=0.2 backbone=llava_onevision_7b tasks=paper
    python run.py sweep=table1 cell=3               # cell 3 of configs/sweep/table1.yaml
    python run.py method=compose method.name=fastv+sharp retention=0.25 +method_kwargs.sharp.retention=0.1
                                                    # registered methods in order, per-child kwargs
    python run.py results_dir=/tmp/res limit=4      # any key of configs/config.yaml
    python run.py batch_size=8 num_processes=2      # throughput: batches of one video layout, 2 processes
    python run.py strict=true                       # the first unusable video stops the cell

Results: <results_dir>/<backbone>/<method>/r<retention>/summary.json (see results/README.md); the end
of the run prints a table of it (scores per task, visual tokens kept, prefill TFLOPs and ms, failed
requests, the summary's path). A finished cell is skipped (overwrite=true reruns it) and its table is
printed again. A request whose video cannot be used is answered '' and counted (``failed_requests``).
Every error about the setup or the arguments (an unknown config key or option, a bad value such as
limit=0 or a layer outside the model, missing weights or data, a method whose config is marked
planned) is one line ``error: ...`` naming the value and the accepted ones, exit status 2, checked
before the model loads.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sharp.harness.config import CONFIG_DIR  # registers the ${sharp_path:...} resolver
from sharp.harness.resources import HarnessError


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(cfg, _overrides())


def run_in_process(argv: list[str]) -> None:
    """``python run.py <argv>`` inside this interpreter (tests, notebooks): the same checks, the same
    ``error:`` line and ``SystemExit(2)``; the config is composed as Hydra composes it."""
    from sharp.harness.config import compose

    register_methods()
    check_command_line(argv)
    run_reporting_errors(compose(argv), list(argv))


def run_reporting_errors(cfg: DictConfig, overrides: list[str]) -> None:
    """Run the cell; a setup or argument error is one ``error:`` line on stderr and exit status 2."""
    from sharp.harness.parallel import ChildFailed
    from sharp.harness.runner import run_cell

    try:
        run_cell(cfg, overrides=overrides)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ChildFailed as err:  # a data-parallel process failed; rank 0 printed its own error
        if err.message:
            print(f"error: {err.message}", file=sys.stderr)
        sys.exit(err.code if err.code > 0 else 2)


def check_command_line(argv: list[str]) -> None:
    """Compose the config as Hydra will (a plain run, not --multirun/--cfg/--help): a Hydra error is one
    line and exit status 2, like the harness's own errors."""
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sharp.harness.checks import hydra_error_line
    from sharp.harness.config import compose

    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {hydra_error_line(err, overrides)}", file=sys.stderr)
        sys.exit(2)


def register_methods() -> None:
    """The methods' generated Hydra configs (``sharp.harness.method_configs``), before Hydra composes; the
    project's method entry points not installed (or older than pyproject.toml) is one error line, exit 2."""
    from sharp.harness.method_configs import register_method_configs

    try:
        register_method_configs()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    register_methods()
    check_command_line(sys.argv[1:])
    main()
