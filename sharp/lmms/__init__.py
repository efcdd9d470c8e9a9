"""lmms-eval model wrappers (``sharp.lmms.models``) and their registration (``sharp.lmms.manifest``).

Import-light on purpose: lmms-eval loads :func:`sharp.lmms.manifest.manifests` while importing
``lmms_eval.models``; the wrapper classes (which import torch and lmms-eval) load on first use.
"""
