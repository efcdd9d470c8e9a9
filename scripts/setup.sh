#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU or GPU). Idempotent.
#  - torch 2.13.0: on CPU-only machines pip picks the CPU build, on a CUDA cluster the CUDA build.
#  - lmms-eval 0.7.3 is installed WITHOUT its declared dependencies (they pull a CUDA-linked
#    torchvision and dev tools that break `import lmms_eval.evaluator` on CPU); requirements-lmms.txt
#    lists what it really imports.
#  - GPU extra: pip install -e ".[gpu]" adds flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$PY -m pip install -q "torch==2.13.0"
# one resolver run for the project and lmms-eval's real imports, under the tested versions
$PY -m pip install -q -e ".[test]" -r requirements-lmms.txt -c constraints.txt
$PY -m pip install -q --no-deps "lmms-eval==0.7.3"
$PY - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("torchvision") is not None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a CUDA-linked torchvision against CPU torch breaks transformers imports
        sys.exit(f"a broken torchvision is installed ({err}); remove it: pip uninstall -y torchvision")
import lmms_eval.evaluator, sharp  # noqa: F401
print("set-up OK")
PY
