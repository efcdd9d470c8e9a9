"""Model manifests for lmms-eval's ``lmms_eval.models`` entry point.

lmms-eval 0.7.3 resolves ``--model NAME`` through ``MODEL_REGISTRY_V2``, which reads the entry
point group ``lmms_eval.models`` when ``lmms_eval.models`` is imported (``pyproject.toml`` points it at
:func:`manifests`). This module must stay import-light: it runs inside lmms-eval's import (the
method registry is read when :func:`manifests` is called).

Ids:
- ``sharp_llava_onevision`` / ``sharp_qwen2_vl``: one generic id per backbone family; method,
  retention and method kwargs come from ``--model_args``.
- ``sharp_llava_video`` / ``sharp_qwen2_5_vl`` / ``sharp_qwen3_vl``: the same for the newer families.
- ``llava_onevision_<method>`` / ``qwen2_vl_<method>`` (and ``llava_video_``, ``qwen2_5_vl_``,
  ``qwen3_vl_``): one id per family x registered method, the
  method fixed. Composed methods use the generic ids: ``method=fastv+sharp,sharp.layer=2``.
"""
from __future__ import annotations

import logging

# Family -> (generic id, class name in sharp.lmms.models)
FAMILIES = {
    "llava_onevision": ("sharp_llava_onevision", "SharpLlavaOneVision"),
    "qwen2_vl": ("sharp_qwen2_vl", "SharpQwen2VL"),
    "llava_video": ("sharp_llava_video", "SharpLlavaVideo"),
    "qwen2_5_vl": ("sharp_qwen2_5_vl", "SharpQwen2_5VL"),
    "qwen3_vl": ("sharp_qwen3_vl", "SharpQwen3VL"),
}


def method_ids() -> list[str]:
    """Methods with their own id: the registered ones whose name is an identifier (``sharp.methods``,
    the one source of truth). Planned methods (configs marked ``implemented: false``) get no id;
    composed names (``fastv+sharp``) go through the generic ids' ``method=`` argument."""
    from sharp.harness.catalog import lmms_method_ids

    return lmms_method_ids()


def model_ids() -> list[str]:
    ids = [generic for generic, _ in FAMILIES.values()]
    ids += [f"{family}_{m}" for family in FAMILIES for m in method_ids()]
    return ids


def manifests():
    """Entry-point payload: a list of ``ModelManifest`` (one per id)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    out = [ModelManifest(model_id=generic, simple_class_path=f"sharp.lmms.models.{cls}")
           for generic, cls in FAMILIES.values()]
    try:
        methods = method_ids()
    except Exception as err:  # noqa: BLE001 - a broken method module must not hide the generic ids
        logging.getLogger(__name__).warning("sharp: per-method lmms-eval ids unavailable (%s: %s); the generic "
                                            "ids %s take method=...", type(err).__name__, err,
                                            ", ".join(g for g, _ in FAMILIES.values()))
        methods = []
    for family, (_generic, cls) in FAMILIES.items():
        for method in methods:
            out.append(ModelManifest(model_id=f"{family}_{method}",
                                     simple_class_path=f"sharp.lmms.models.{cls}__{method}"))
    return out


def register(overwrite: bool = True) -> None:
    """Register the manifests at runtime (for a checkout that was not ``pip install``-ed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=overwrite)
