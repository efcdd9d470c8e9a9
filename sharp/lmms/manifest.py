"""Model manifests for lmms-eval's ``lmms_eval.models`` entry point.

lmms-eval 0.7.3 resolves ``--model NAME`` through ``MODEL_REGISTRY_V2``, which reads the entry
point group ``lmms_eval.models`` when ``lmms_eval.models`` is imported (``pyproject.toml`` points it at
:func:`manifests`). This module must stay import-light: it runs inside lmms-eval's import.

Ids:
- ``sharp_llava_onevision`` / ``sharp_qwen2_vl``: one generic id per backbone family; method,
  retention and method kwargs come from ``--model_args``.
- ``llava_onevision_<method>`` / ``qwen2_vl_<method>``: one id per family x method, the method fixed.
"""
from __future__ import annotations

import sys

# Family -> (generic id, class name in sharp.lmms.models)
FAMILIES = {
    "llava_onevision": ("sharp_llava_onevision", "SharpLlavaOneVision"),
    "qwen2_vl": ("sharp_qwen2_vl", "SharpQwen2VL"),
}

# Every method the project ships or plans; an id whose method is not registered (yet) resolves to
# a class whose construction fails with the engine's "unknown pruning method" error.
METHODS = (
    "vanilla", "fastv", "pdrop", "feather", "framefusion", "sharp",
    "visionzip", "holitom", "sharpv", "visionzip_sharp", "holitom_sharp",
)


def method_ids() -> list[str]:
    names = list(METHODS)
    registry = getattr(sys.modules.get("sharp.methods"), "_REGISTRY", None)  # only if already imported
    if registry:
        names += [m for m in sorted(registry) if m not in names and m.isidentifier()]
    return names


def model_ids() -> list[str]:
    ids = [generic for generic, _ in FAMILIES.values()]
    ids += [f"{family}_{m}" for family in FAMILIES for m in method_ids()]
    return ids


def manifests():
    """Entry-point payload: a list of ``ModelManifest`` (one per id)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    out = []
    for family, (generic, cls) in FAMILIES.items():
        out.append(ModelManifest(model_id=generic, simple_class_path=f"sharp.lmms.models.{cls}"))
        for method in method_ids():
            out.append(ModelManifest(model_id=f"{family}_{method}",
                                     simple_class_path=f"sharp.lmms.models.{cls}__{method}"))
    return out


def register(overwrite: bool = True) -> None:
    """Register the manifests at runtime (for a checkout that was not ``pip install``-ed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=overwrite)
