#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU or GPU). Idempotent.
#   bash scripts/setup.sh                     # current lines: torch 2.15.0, transformers 5.x (constraints.txt)
#   TORCH=2.13 bash scripts/setup.sh          # older tested torch line: torch 2.13.0
#   TRANSFORMERS=4.57 bash scripts/setup.sh   # older transformers line: 4.57.x (constraints-4.57.txt)
#   PYTHON=/path/to/venv/bin/python ...       # install into that interpreter (default: python3)
#  - torch (declared >=2.13,<3 in pyproject.toml) is installed first, at the exact version of the line.
#    2.15.0 from PyPI is a CUDA build (~540 MB wheel + ~4 GB of nvidia-*/cuda-* wheels; it runs on CPU
#    too); 2.13.0 resolves to the CPU wheel where one is on the package index (these machines) and to
#    the CUDA build elsewhere. A machine-wide pip constraint capping torch stops the default line with
#    pip's own message; then lift it for this command (PIP_CONSTRAINT=/dev/null bash scripts/setup.sh)
#    or pick TORCH=2.13.
#  - torchvision, only next to a CUDA build of torch (PyPI's torchvision wheels are CUDA builds; one next
#    to a CPU torch breaks every import of it, transformers' included): 0.29.2 with 2.15.0 (the newest
#    release; there is no torchvision for 2.15 yet, 0.29.2 declares torch>=2.14 and runs the suite
#    with it), 0.28.0 with 2.13.0. qwen-vl-utils (a dependency: lmms-eval's Qwen wrappers call it)
#    imports torchvision; without it sharp.backbones.video computes its formulas itself (the same
#    values, tests/test_qwen_vl_utils.py).
#  - lmms-eval 0.7.3 is installed WITHOUT its declared dependencies (they pull torchvision at whatever
#    version and dev tools); requirements-lmms.txt lists what it really imports.
#  - the constraints files are the tested sets (scripts/pin_constraints.py writes them; torch, torchvision
#    and torch's CUDA wheels are this script's, per TORCH line, so they are not pinned there).
#  - GPU extra: pip install -e ".[gpu]" adds flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${TRANSFORMERS:-5}" in
    5|5.x|current) CONSTRAINTS=constraints.txt ;;
    4.57|4.57.x) CONSTRAINTS=constraints-4.57.txt ;;
    *) echo "error: TRANSFORMERS=${TRANSFORMERS}: expected 5 (default, current line) or 4.57" >&2; exit 2 ;;
esac
case "${TORCH:-2.15}" in
    2.15|2.15.0|current) TORCH_PIN=torch==2.15.0; TORCHVISION_PIN=torchvision==0.29.2 ;;
    2.13|2.13.0) TORCH_PIN=torch==2.13.0; TORCHVISION_PIN=torchvision==0.28.0 ;;
    *) echo "error: TORCH=${TORCH}: expected 2.15 (default, current line) or 2.13" >&2; exit 2 ;;
esac
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $PY -m pip install -q "$TORCH_PIN"; then
    echo "error: pip could not install $TORCH_PIN (its message is above). A machine-wide pip constraint" \
         "can cap torch ('$PY -m pip config list' shows it): lift it for this command with" \
         "PIP_CONSTRAINT=/dev/null bash scripts/setup.sh, or pick the older line with TORCH=2.13" >&2
    exit 2
fi
# (-W ignore: numpy is not installed yet, and torch warns about it on import)
if $PY -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    $PY -m pip install -q "$TORCH_PIN" "$TORCHVISION_PIN"
fi
# one resolver run for the project and lmms-eval's real imports, under the tested versions
# (PYTHONWARNINGS: setuptools' generic note on editable installs is not a problem of this set-up)
PYTHONWARNINGS=ignore $PY -m pip install -q -e ".[test]" -r requirements-lmms.txt -c "$CONSTRAINTS"
$PY -m pip install -q --no-deps "lmms-eval==0.7.3"
$PY - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("torchvision") is not None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a CUDA-linked torchvision against CPU torch breaks transformers imports
        sys.exit(f"a broken torchvision is installed ({err}); remove it: pip uninstall -y torchvision")
import lmms_eval.evaluator, sharp, torch, transformers  # noqa: F401
from sharp.backbones.video import qwen_vl_utils_module
qwen = "qwen-vl-utils in use" if qwen_vl_utils_module() is not None else "qwen-vl-utils not importable (no torchvision)"
print(f"set-up OK: transformers {transformers.__version__}, torch {torch.__version__}, {qwen}")
PY
