"""transformers 4.57.x / 5.x helpers only the tests use: the model's own answers, for references.

The tests compare the backbones' own computations (M-RoPE positions, vision RoPE, video features,
the family preprocessing) with what the HF model and processor return; where those calls differ
between the two lines, these helpers return 4.57's form on both (detected from the installed
code, never from a version string):

==========================  ===============================  ====================================
what                        4.57.x                           5.x
==========================  ===============================  ====================================
``get_rope_index`` call     ``(input_ids, image_grid_thw,    ``(input_ids, mm_token_type_ids,
                            video_grid_thw, ...)``           image_grid_thw, ...)``
Qwen2.5-VL vision RoPE      ``visual.rot_pos_emb(grid)``     ``visual.rotary_pos_emb(x, ids)`` ->
                            (angles)                         (cos, sin), ids from ``vision_utils``
Qwen3-VL video features     ``(embeds, deepstack)``, the     ModelOutput, ``deepstack_features``
                            features (N, d) per layer        split per video
LLaVA-OV video features     ``get_video_features`` without   the newline appended inside
                            the newline (forward adds it)    ``get_video_features``
Qwen2-VL image processor    takes ``videos=``                images only (videos: the torchvision
                                                             ``Qwen2VLVideoProcessor``)
==========================  ===============================  ====================================

Helpers: :func:`rope_index`, :func:`vision_rope`, :func:`qwen3vl_video_features`,
:func:`llava_ov_video_features` and :func:`vision_tokens`, :func:`qwen_video_patches`. What the
engine uses is ``sharp.engine.compat``, what the backbones use ``sharp.backbones.compat``.
"""
from __future__ import annotations

import inspect

import torch

from sharp.backbones.compat import text_inputs


# -- the model ----------------------------------------------------------------------------------
def rope_index(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner model's own ``get_rope_index(input_ids, ...)`` (keyword arguments: ``video_grid_thw``,
    ``attention_mask``, ...), with the ``mm_token_type_ids`` 5.x requires (:func:`text_inputs`)."""
    return model.model.get_rope_index(input_ids, **{**text_inputs(model, input_ids), **kwargs})


# -- the video path (the model's own features) --------------------------------------------------
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


# -- Qwen2.5-VL / Qwen3-VL vision towers --------------------------------------------------------
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


# -- the HF processors (the family preprocessing is compared with them) -------------------------
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
