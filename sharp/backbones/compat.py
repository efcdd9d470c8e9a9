"""What the backbones need to run unmodified on transformers 4.57.x and 5.x.

Every difference is detected from the installed code (a signature, an attribute), never from a
version string, and each helper returns what the backbones expect on both lines:

==========================  ===============================  ====================================
what                        4.57.x                           5.x
==========================  ===============================  ====================================
``generate`` and pixels     pixels reach the first forward   the vision tower runs BEFORE the
                                                             first forward (``mm_encoder_outputs``)
Qwen2-VL M-RoPE positions   from ``input_ids``               need ``mm_token_type_ids``; text after
(Qwen2.5-VL, Qwen3-VL too)                                   a video starts at ``max(h, w)``, not
                                                             after the video's largest position
                                                             (Qwen2.5-VL: absolute time is larger);
                                                             padding 0, deltas vs. unpadded length
Qwen2.5-VL temporal index   ``t * int64(second_per_grid_t)   ``(t * second_per_grid_t * tps)``
                            * tokens_per_second``            in float, then ``long()``
Qwen2.5-VL window index     ``visual.get_window_index``      ``get_vision_window_index`` in
                                                             ``transformers.vision_utils``
SigLIP tower (LLaVA-OV,     ``vision_model.encoder``;        ``encoder``; weights
LLaVA-Video)                weights ``...vision_model.*``    ``model.vision_tower.*``
==========================  ===============================  ====================================

:func:`adapt_model` (called once per :class:`~sharp.backbones.Backbone`) makes a 5.x model run as
the 4.57 code behind the recorded numbers does: pixels go through the first forward (so the
engine's hooks see the vision tower and the layout inside the prefill, and timings include it),
and the M-RoPE positions of Qwen2-VL, Qwen2.5-VL and Qwen3-VL follow 4.57's ``get_rope_index``.
The remaining rows have a helper each: :func:`text_inputs`, :func:`vision_window_index`,
:func:`siglip_encoder`, :func:`match_state_dict`. LLaVA-Video is LLaVA-OV's HF class, so it needs
nothing beyond LLaVA-OV's rows.

The engine's half (KV cache keyword, ``create_causal_mask``, the layers' ``cache_position`` and
``(cos, sin)``) is :mod:`sharp.engine.compat`; helpers only the tests use (the model's own
``get_rope_index``, vision RoPE and video features, the Qwen2-VL processor's video path) are in
``tests/compat_helpers.py``.
"""
from __future__ import annotations

import inspect
import itertools
import types
from typing import Optional

import torch


# -- inputs -------------------------------------------------------------------------------------
def text_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """Extra tokenizer outputs the model's forward needs: 5.x Qwen2-VL computes M-RoPE positions from
    ``mm_token_type_ids`` (0 text, 1 image, 2 video), as its processor returns them."""
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"mm_token_type_ids": _token_types(model.config, input_ids)}


def _token_types(config, input_ids: torch.Tensor) -> torch.Tensor:
    types_ = torch.zeros_like(input_ids)
    for kind, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(config, name, None)
        if token is not None:
            types_ = types_.masked_fill(input_ids == token, kind)
    return types_


# -- the model ----------------------------------------------------------------------------------
# inner model class -> how its 4.57 ``get_rope_index`` numbers a video's temporal patches:
# "index" t (Qwen2-VL), "seconds" t x second_per_grid_t x tokens_per_second (Qwen2.5-VL),
# "per_patch" every temporal patch its own grid with t = 1 (Qwen3-VL: timestamps between them)
_MROPE_457 = {"Qwen2VLModel": "index", "Qwen2_5_VLModel": "seconds", "Qwen3VLModel": "per_patch"}


def adapt_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a 5.x model behave as the 4.57 code behind the recorded numbers (no-op on 4.57).

    * generate encodes pixels inside the first forward (5.x runs the vision tower before it and
      passes ``mm_encoder_outputs``): the same computation, seen by the engine's prefill hooks.
    * Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``get_rope_index`` with 4.57's rule (:func:`_mrope_index_457`:
      text after a video continues after the largest position of the video; padded positions 1;
      deltas against the padded length). 5.x continues at max(h, w), which differs once a video's
      temporal index outgrows its rows/columns (Qwen2-VL: 32 frames at modest resolution; Qwen2.5-VL:
      absolute time, t x second_per_grid_ts x tokens_per_second, almost always).
    Idempotent; only instance attributes are set (the classes are untouched).
    """
    if getattr(model, "_sharp_adapted", False):
        return model
    if hasattr(type(model), "_supports_mm_encoder_outputs"):
        model._supports_mm_encoder_outputs = lambda: False
    inner = getattr(model, "model", None)
    rope_index = getattr(type(inner), "get_rope_index", None)
    if (type(inner).__name__ in _MROPE_457 and rope_index is not None
            and "mm_token_type_ids" in inspect.signature(rope_index).parameters):
        inner.get_rope_index = types.MethodType(_mrope_index_457, inner)
    model._sharp_adapted = True
    return model


def _mrope_index_457(self, input_ids: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor] = None,
                     image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                     second_per_grid_ts: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """5.x signature, 4.57 positions: (3, b, s) position ids and (b, 1) rope deltas. Token kinds
    come from ``input_ids`` as on 4.57 (``mm_token_type_ids`` is not read). Per family
    (:data:`_MROPE_457`) the temporal index of a video is 4.57's:

    * Qwen2-VL: ``arange(t)``;
    * Qwen2.5-VL: ``arange(t) * second_per_grid_t * tokens_per_second`` with ``second_per_grid_t``
      cast to int64 first, exactly as 4.57 (``torch.as_tensor(..., dtype=range_tensor.dtype)``;
      1.0 s per temporal patch, the processor's default, is unaffected); images get 0;
    * Qwen3-VL: each temporal patch is its own grid (t = 1), text (timestamps) between them.
    """
    rule = _MROPE_457[type(self).__name__]
    merge = self.config.vision_config.spatial_merge_size
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if rule == "per_patch" and video_grid_thw is not None:
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        video_grid_thw[:, 0] = 1
    position_ids = torch.ones(3, b, s, dtype=input_ids.dtype, device=input_ids.device)
    grids = {1: iter(image_grid_thw) if image_grid_thw is not None else None,
             2: iter(video_grid_thw) if video_grid_thw is not None else None}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else itertools.repeat(1.0)
    types_ = _token_types(self.config, input_ids)  # from input_ids, as 4.57 (not the argument)
    deltas = []
    for i in range(b):
        keep = attention_mask[i].bool()
        kinds = types_[i][keep].tolist()
        parts, start = [], 0
        for kind, group in itertools.groupby(kinds):
            n = len(list(group))
            if kind == 0:
                parts.append(torch.arange(n).view(1, -1).expand(3, -1) + start)
            else:
                t, h, w = (int(x) for x in next(grids[kind]))
                time = torch.arange(t)
                if rule == "seconds" and kind == 2:
                    per_t = torch.as_tensor(next(seconds), dtype=time.dtype)  # 4.57: int64 seconds
                    time = (time * per_t * self.config.vision_config.tokens_per_second).long()
                grid = torch.stack(torch.meshgrid(time, torch.arange(h // merge), torch.arange(w // merge),
                                                  indexing="ij"))
                parts.append(grid.reshape(3, -1) + start)
            start = int(parts[-1].max()) + 1
        positions = torch.cat(parts, dim=1)
        position_ids[:, i, keep] = positions.to(position_ids)
        deltas.append(int(positions.max()) + 1 - s)
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


# -- weights ------------------------------------------------------------------------------------
# (4.57 name, 5.x name) of module paths that moved; a state dict saved on either line loads on both
_RENAMED = (("model.vision_tower.vision_model.", "model.vision_tower."),)


def match_state_dict(model: torch.nn.Module, state: dict) -> dict:
    """``state`` with its keys renamed to ``model``'s own names where a module path moved between
    4.57 and 5.x (LLaVA-OV's SigLIP tower lost its ``vision_model`` wrapper)."""
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in own:
            for old, new in _RENAMED:
                for a, b in ((old, new), (new, old)):
                    if key.startswith(a) and b + key[len(a):] in own:
                        key = b + key[len(a):]
                        break
        out[key] = value
    return out


# -- vision towers ------------------------------------------------------------------------------
def siglip_encoder(vision_tower: torch.nn.Module) -> torch.nn.Module:
    """The SigLIP encoder of LLaVA-OV's tower (4.57 wraps it in ``vision_model``)."""
    return getattr(vision_tower, "vision_model", vision_tower).encoder


def vision_window_index(visual: torch.nn.Module, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window permutation of ``grid_thw`` (merge groups, sample after sample) and its
    ``cu_window_seqlens``: 4.57's ``visual.get_window_index``; 5.x moved it out of the model into
    ``transformers.vision_utils.get_vision_window_index`` (same computation, config scalars passed)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)
