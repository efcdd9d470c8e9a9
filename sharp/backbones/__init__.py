"""Backbones: unmodified HF video LLMs, one class per model family, plus video I/O and model configs.

Every module of this package other than the shared ones below is a family module that registers
its :class:`Backbone` subclass with ``@register_family`` when imported; they are all imported here,
so a new family is one new file (see ``docs/backbones.md``).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from sharp.backbones.base import (ATTN_IMPLEMENTATIONS, FAMILIES, Backbone, VisualLayout, backbone_config_path,
                                  backbone_family, backbone_names, family_class, load_backbone, register_backbone,
                                  register_family)
from sharp.backbones.vision import VisionMaps

_SHARED_MODULES = {"base", "compat", "tokenizer", "video", "vision"}
for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED_MODULES and not _module.name.startswith("_") and not _module.ispkg:
        _importlib.import_module(f"{__name__}.{_module.name}")

from sharp.backbones.llava_onevision import LlavaOneVisionBackbone  # noqa: E402
from sharp.backbones.qwen2_vl import Qwen2VLBackbone  # noqa: E402

__all__ = ["ATTN_IMPLEMENTATIONS", "Backbone", "VisualLayout", "VisionMaps", "backbone_config_path",
           "backbone_family", "backbone_names", "load_backbone", "FAMILIES", "family_class", "register_backbone",
           "register_family", "LlavaOneVisionBackbone", "Qwen2VLBackbone"]
