"""Run a sweep of cells (configs/sweep/<name>.yaml): one line per cell with --dry-run, locally one
after another by default, or one SLURM job per cell with --slurm (Hydra's submitit launcher,
configs/hydra/launcher/slurm.yaml). Finished cells are skipped.

    python scripts/sweep.py table1 --dry-run
    python scripts/sweep.py table1                                   # local, sequential
    python scripts/sweep.py table1 --slurm hydra.launcher.partition=gpu
    python scripts/sweep.py smoke --limit 4                          # tiny backbone, synthetic task
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharp.harness.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
