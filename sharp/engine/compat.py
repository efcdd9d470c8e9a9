"""The one place where transformers 4.57.x and 5.x differ for the engine and the backbones.

Every difference is detected from the installed code (a signature, an attribute), never from a
version string, and each helper returns what the rest of the project expects on both lines:

==========================  ===============================  ====================================
what                        4.57.x                           5.x
==========================  ===============================  ====================================
KV cache keyword / output   ``past_key_values``              ``cache``
``create_causal_mask``      ``input_embeds``,                ``inputs_embeds``, ``cache``,
                            ``cache_position``,              ``layer_idx`` (query offset from
                            ``past_key_values``              ``cache.get_query_offset``)
decoder layer kwargs        ``cache_position`` passed        no ``cache_position``
``generate`` and pixels     pixels reach the first forward   the vision tower runs BEFORE the
                                                             first forward (``mm_encoder_outputs``)
Qwen2-VL M-RoPE positions   from ``input_ids``               need ``mm_token_type_ids``; text after
(Qwen2.5-VL, Qwen3-VL too)                                   a video starts at ``max(h, w)``, not
                                                             after the video's largest position
                                                             (Qwen2.5-VL: absolute time is larger);
                                                             padding 0, deltas vs. unpadded length
Qwen2.5-VL temporal index   ``t * int64(second_per_grid_t)   ``(t * second_per_grid_t * tps)``
                            * tokens_per_second``            in float, then ``long()``
``get_rope_index`` call     ``(input_ids, image_grid_thw,    ``(input_ids, mm_token_type_ids,
                            video_grid_thw, ...)``           image_grid_thw, ...)``
Qwen2-VL ``(cos, sin)``     (3, b, s, d), merged by          (b, s, d), sections already merged:
(Qwen2.5-VL too)            ``apply_multimodal_rotary...``   plain ``apply_rotary_pos_emb``
Qwen2.5-VL window index     ``visual.get_window_index``      ``get_vision_window_index`` in
                                                             ``transformers.vision_utils``
Qwen2.5-VL vision RoPE      ``visual.rot_pos_emb(grid)``     ``visual.rotary_pos_emb(x, ids)`` ->
                            (angles)                         (cos, sin), ids from ``vision_utils``
Qwen3-VL video features     ``(embeds, deepstack)``, the     ModelOutput, ``deepstack_features``
                            features (N, d) per layer        split per video
Qwen2-VL image processor    takes ``videos=``                images only (videos: the torchvision
                                                             ``Qwen2VLVideoProcessor``)
SigLIP tower (LLaVA-OV,     ``vision_model.encoder``         ``encoder``
LLaVA-Video)
==========================  ===============================  ====================================

:func:`adapt_model` (called once per :class:`~sharp.backbones.Backbone`) makes a 5.x model run as
the 4.57 code behind the recorded numbers does: pixels go through the first forward (so the
engine's hooks see the vision tower and the layout inside the prefill, and timings include it),
and the M-RoPE positions of Qwen2-VL, Qwen2.5-VL and Qwen3-VL follow 4.57's ``get_rope_index``.
The remaining rows have a helper each: :func:`rope_index`, :func:`vision_window_index`,
:func:`vision_rope`, :func:`qwen3vl_video_features`, :func:`qwen_video_patches`, :func:`siglip_encoder`.
LLaVA-Video is LLaVA-OV's HF class, so it needs nothing beyond LLaVA-OV's rows.
"""
from __future__ import annotations

import inspect
import itertools
import sys
import types
from typing import Any, Callable, Optional

import torch
from transformers.masking_utils import create_causal_mask

_MASK_PARAMS = inspect.signature(create_causal_mask).parameters
# 4.57: create_causal_mask(config, input_embeds, attention_mask, cache_position, past_key_values, ...)
MASK_TAKES_CACHE_POSITION = "cache_position" in _MASK_PARAMS

CACHE_KWARGS = ("past_key_values", "cache")  # the KV cache keyword of model and layer calls (4.57, 5.x)


def cache_of(kwargs: dict) -> Any:
    """The KV cache passed to a model or decoder-layer call (None if there is none)."""
    for key in CACHE_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def output_cache(output) -> Any:
    """The KV cache of a model or generate output (``past_key_values`` on 4.57, ``cache`` on 5.x)."""
    for key in CACHE_KWARGS:
        got = getattr(output, key, None)
        if got is not None:
            return got
    return None


def without_cache(kwargs: dict, *extra: str) -> dict:
    """``kwargs`` less the cache keyword(s) (and ``extra`` keys)."""
    drop = set(CACHE_KWARGS) | set(extra)
    return {k: v for k, v in kwargs.items() if k not in drop}


class _PastLength:
    """Stands in for a cache in ``create_causal_mask``: one layer's cache of ``past`` entries."""

    is_compileable = False

    def __init__(self, past: int):
        self.past = past

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        q = query if isinstance(query, int) else query.shape[0]  # 5.x: query length; 4.57: cache_position
        return self.past + q, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past


def causal_mask(config, hidden: torch.Tensor, attention_mask_2d: Optional[torch.Tensor], past: int = 0):
    """transformers' own causal + padding mask, in the format of ``config._attn_implementation``, for
    the queries ``hidden`` (b, q, d) after ``past`` cached keys; ``attention_mask_2d`` (b, past + q)."""
    q = hidden.shape[1]
    cache = _PastLength(past) if past else None
    if MASK_TAKES_CACHE_POSITION:
        return create_causal_mask(config=config, input_embeds=hidden, attention_mask=attention_mask_2d,
                                  cache_position=torch.arange(past, past + q, device=hidden.device),
                                  past_key_values=cache, position_ids=None)
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask_2d, cache=cache,
                              position_ids=None, layer_idx=0)


_LAYER_TAKES_CACHE_POSITION: dict[type, bool] = {}


def set_cache_position(layer: torch.nn.Module, kwargs: dict, cache_position: torch.Tensor) -> dict:
    """Put ``cache_position`` into a decoder layer's kwargs where the layer takes one (4.57)."""
    cls = type(layer)
    if cls not in _LAYER_TAKES_CACHE_POSITION:
        _LAYER_TAKES_CACHE_POSITION[cls] = "cache_position" in inspect.signature(cls.forward).parameters
    if _LAYER_TAKES_CACHE_POSITION[cls]:
        kwargs["cache_position"] = cache_position
    else:
        kwargs.pop("cache_position", None)
    return kwargs


def step_positions(kwargs: dict, hidden: torch.Tensor) -> torch.Tensor:
    """(b, q) 1-D positions of a decode step's queries as the layer call states them."""
    pos = kwargs.get("position_ids")
    if pos is not None:
        return pos if pos.dim() == 2 else pos[0]
    cache_position = kwargs.get("cache_position")
    if cache_position is None:  # the unpruned frame: layer 0's cache length
        past = cache_of(kwargs).get_seq_length()
        cache_position = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    return cache_position[None].expand(hidden.shape[0], -1)


def rope_function(attn: torch.nn.Module) -> Callable:
    """The attention module's own RoPE, as f(x (b, h, n, d), cos, sin) -> x, for the ``(cos, sin)``
    its decoder layer receives (4.57 Qwen2-VL: per-section angles merged by
    ``apply_multimodal_rotary_pos_emb``; 5.x: already merged)."""
    module = sys.modules[type(attn).__module__]
    if hasattr(module, "apply_multimodal_rotary_pos_emb"):
        section = attn.rope_scaling["mrope_section"]
        return lambda x, cos, sin: module.apply_multimodal_rotary_pos_emb(x, x, cos, sin, section)[0]
    return lambda x, cos, sin: module.apply_rotary_pos_emb(x, x, cos, sin)[0]


def siglip_encoder(vision_tower: torch.nn.Module) -> torch.nn.Module:
    """The SigLIP encoder of LLaVA-OV's tower (4.57 wraps it in ``vision_model``)."""
    return getattr(vision_tower, "vision_model", vision_tower).encoder


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


def rope_index(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner model's own ``get_rope_index(input_ids, ...)`` (keyword arguments: ``video_grid_thw``,
    ``attention_mask``, ...), with the ``mm_token_type_ids`` 5.x requires (:func:`text_inputs`)."""
    return model.model.get_rope_index(input_ids, **{**text_inputs(model, input_ids), **kwargs})


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


# -- the video path (tests and tools that compare with the model's own features) ------------------
def vision_tokens(output) -> torch.Tensor:
    """The LLM tokens a vision tower call returns (5.x: a ModelOutput whose ``pooler_output`` holds them)."""
    return getattr(output, "pooler_output", output)


def llava_ov_video_features(inner: torch.nn.Module, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """LLaVA-OV's pooled video features (b, T x side'^2, d) WITHOUT the image_newline: 4.57's
    ``get_video_features`` returns them and its forward appends the newline; 5.x appends it inside
    ``get_video_features`` (``pooler_output`` (b, T x side'^2 + 1, d)). apply_pooling is unchanged."""
    cfg = inner.config
    out = inner.get_video_features(pixel_values_videos, vision_feature_layer=cfg.vision_feature_layer,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    if hasattr(out, "pooler_output"):
        return out.pooler_output[:, :-1]
    return out


# -- Qwen2.5-VL / Qwen3-VL vision towers ----------------------------------------------------------
def vision_window_index(visual: torch.nn.Module, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window permutation of ``grid_thw`` (merge groups, sample after sample) and its
    ``cu_window_seqlens``: 4.57's ``visual.get_window_index``; 5.x moved it out of the model into
    ``transformers.vision_utils.get_vision_window_index`` (same computation, config scalars passed)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)


def vision_rope(visual: torch.nn.Module, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` (N, head_dim) of a Qwen vision tower's 2-D RoPE per patch row in PREPROCESSING
    order (before Qwen2.5-VL's window permutation): 4.57 ``rot_pos_emb`` (angles, duplicated and
    cos/sin taken by the forward); 5.x the rotary module on ``get_vision_position_ids`` rows."""
    if hasattr(visual, "rot_pos_emb"):
        angles = visual.rot_pos_emb(grid_thw)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()
    from transformers.vision_utils import get_vision_position_ids

    position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    return visual.rotary_pos_emb(position_ids, position_ids)


def qwen3vl_video_features(inner: torch.nn.Module, pixel_values_videos: torch.Tensor,
                           video_grid_thw: torch.Tensor) -> tuple[tuple, list]:
    """Qwen3-VL's ``get_video_features`` as 4.57 returns it: (per-video tokens, DeepStack features as a
    list of (N_visual_total, d), rows sample after sample). 5.x returns a ModelOutput whose
    ``deepstack_features`` are split per video."""
    out = inner.get_video_features(pixel_values_videos, video_grid_thw)
    if isinstance(out, tuple):
        return out
    return out.pooler_output, [torch.cat(list(f), dim=0) if isinstance(f, (tuple, list)) else f
                               for f in out.deepstack_features]


# -- the HF processors (tests that compare the family preprocessing with them) ---------------------
def qwen_video_patches(image_processor, frames, **kwargs) -> dict:
    """``{"pixel_values_videos", "video_grid_thw"}`` of one video (T, H, W, 3) uint8 through a Qwen2-VL
    IMAGE processor: 4.57 takes ``videos=`` there; 5.x moved videos to ``Qwen2VLVideoProcessor``
    (torchvision only), so each frame goes through the image path with ``temporal_patch_size=1`` (the
    same resize, rescale and normalisation) and the frames of each temporal patch are interleaved as
    the video path does (columns: channel, then frame, then the patch pixels; the last frame repeated
    to fill the last patch). ``kwargs``: the processor call's own (``min_pixels``, ``do_resize``...)."""
    if "videos" in inspect.signature(image_processor.preprocess).parameters:
        out = image_processor(images=None, videos=[frames], return_tensors="pt", **kwargs)
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}
    tps, p = image_processor.temporal_patch_size, image_processor.patch_size
    frames = list(frames)
    while len(frames) % tps:
        frames.append(frames[-1])
    limits = {k: kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in kwargs}
    if limits:  # 5.x: pixel limits of a call are size's edges (the old names are deprecated)
        kwargs["size"] = {**dict(image_processor.size), **{("shortest_edge" if k == "min_pixels" else "longest_edge"): v
                                                           for k, v in limits.items()}}
    out = image_processor(images=frames, temporal_patch_size=1, return_tensors="pt", **kwargs)
    grid = out["image_grid_thw"]  # (T, 3): (1, h, w) per frame
    h, w = int(grid[0, 1]), int(grid[0, 2])
    rows = out["pixel_values"].reshape(len(frames) // tps, tps, h * w, 3, p, p)  # (t, frame, row, c, p, p)
    pixels = rows.permute(0, 2, 3, 1, 4, 5).reshape(len(frames) // tps * h * w, 3 * tps * p * p)
    return {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[len(frames) // tps, h, w]])}
