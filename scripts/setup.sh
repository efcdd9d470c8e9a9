#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU or GPU). Idempotent.
#   bash scripts/setup.sh                     # current line: transformers 5.x (constraints.txt)
#   TRANSFORMERS=4.57 bash scripts/setup.sh   # older line: transformers 4.57.x (constraints-4.57.txt)
#   PYTHON=/path/to/venv/bin/python ...       # install into that interpreter (default: python3)
#  - torch 2.13.0: on CPU-only machines pip picks the CPU build, on a CUDA cluster the CUDA build.
#  - lmms-eval 0.7.3 is installed WITHOUT its declared dependencies (they pull a CUDA-linked
#    torchvision and dev tools that break `import lmms_eval.evaluator` on CPU); requirements-lmms.txt
#    lists what it really imports.
#  - the constraints files are the tested sets (scripts/pin_constraints.py writes them).
#  - GPU extra: pip install -e ".[gpu]" adds flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${TRANSFORMERS:-5}" in
    5|5.x|current) CONSTRAINTS=constraints.txt ;;
    4.57|4.57.x) CONSTRAINTS=constraints-4.57.txt ;;
    *) echo "error: TRANSFORMERS=${TRANSFORMERS}: expected 5 (default, current line) or 4.57" >&2; exit 2 ;;
esac
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$PY -m pip install -q "torch==2.13.0"
# one resolver run for the project and lmms-eval's real imports, under the tested versions
$PY -m pip install -q -e ".[test]" -r requirements-lmms.txt -c "$CONSTRAINTS"
$PY -m pip install -q --no-deps "lmms-eval==0.7.3"
$PY - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("torchvision") is not None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a CUDA-linked torchvision against CPU torch breaks transformers imports
        sys.exit(f"a broken torchvision is installed ({err}); remove it: pip uninstall -y torchvision")
import lmms_eval.evaluator, sharp, torch, transformers  # noqa: F401
print(f"set-up OK: transformers {transformers.__version__}, torch {torch.__version__}")
PY
