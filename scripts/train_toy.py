#!/usr/bin/env python
"""Train the toy video LLMs on the synthetic benchmarks and write their weights (default: sharp/weights/).

    python scripts/train_toy.py                       # both toys, shipped settings -> sharp/weights/
    python scripts/train_toy.py --backbone toy_qwen2_vl --out-dir /tmp/toy   # elsewhere

A thin command line over :func:`sharp.toy.training.main` (the settings, probes and training loop live in
``sharp.toy.training`` and ``sharp.toy.probes``); ``--help`` lists the options.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sharp.toy import training  # noqa: E402

if __name__ == "__main__":
    sys.exit(training.main(sys.argv[1:]))
