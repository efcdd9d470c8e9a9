"""Evaluate one cell (backbone x method x retention x tasks) through lmms-eval.

    python run.py                                   # tiny backbone + synthetic task, offline, ~2 min on CPU
    python run.py method=fastv retention=0.25
    python run.py method=sharp retention=0.2 backbone=llava_onevision_7b tasks=paper
    python run.py sweep=table1 cell=3               # cell 3 of configs/sweep/table1.yaml
    python run.py method=compose method.name=fastv+sharp retention=0.25 +method_kwargs.sharp.retention=0.1
                                                    # registered methods in order, per-child kwargs
    python run.py results_dir=/tmp/res limit=4      # any key of configs/config.yaml

Results: <results_dir>/<backbone>/<method>/r<retention>/summary.json (see results/README.md).
A finished cell is skipped (overwrite=true reruns it). Errors about the setup (missing weights or
data, bad arguments, a method whose config is marked planned but that is not implemented yet) print
a message and exit with status 2, without a stack trace.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sharp.harness.config import CONFIG_DIR  # registers the ${sharp_path:...} resolver
from sharp.harness.resources import HarnessError


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sharp.harness.runner import run_cell

    try:
        run_cell(cfg)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
