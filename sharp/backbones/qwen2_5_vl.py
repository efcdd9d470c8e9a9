"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout with a windowed ViT and timed M-RoPE.

What differs from Qwen2-VL (``qwen2_vl.py``, which this class extends) and how it is handled:

* Vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel.forward``): before the blocks the
  patch rows are REORDERED by ``window_index`` (4.57 ``get_window_index``, 5.x
  ``vision_utils.get_vision_window_index``: :func:`sharp.backbones.compat.vision_window_index`): merge groups of
  ``spatial_merge_size^2`` consecutive rows are moved window by window (``window_size`` px = 112 for
  the 7B: 4 x 4 merged tokens = 8 x 8 patches per window). Blocks in ``fullatt_block_indexes``
  (7B: 7, 15, 23, 31) attend inside each temporal patch (``cu_seqlens``); every other block
  attends inside each window only (``cu_window_seqlens``). After the merger the model undoes the
  order with ``argsort(window_index)``. :meth:`visual_features_to_tokens` does the same: mean over
  each merge group (the merger's group), then the inverse window permutation, so ``ctx.vision``
  maps are in the LLM's visual order. The attention chunks of a captured block are its own
  ``cu_seqlens`` keyword (window or temporal patch), so a windowed block's received attention is
  within-window attention (documented in docs/backbones.md).
* The window permutation depends on ``grid_thw`` (not in a block's call): the session hook
  (:meth:`install_session_hooks`) adds the vision tower's ``grid_thw`` to every captured block call.
* Vision norm is RMSNorm and the MLP gated (SiLU); ``norm1`` / ``attn.qkv`` / ``attn.scaling`` and the
  module's ``apply_rotary_pos_emb_vision`` keep Qwen2-VL's names, so queries/keys/RoPE are shared.
* LLM positions: M-RoPE whose temporal index is ABSOLUTE time, ``t * second_per_grid_ts *
  tokens_per_second`` (``Qwen2_5_VLModel.get_rope_index``). The processor returns
  ``second_per_grid_ts = temporal_patch_size / fps`` with ``fps`` = 2.0 unless given
  (``Qwen2_5_VLProcessor.__call__``); lmms-eval 0.7.3's ``qwen2_5_vl`` wrapper passes no fps, so
  1.0 s per temporal patch. :meth:`video_pixels` returns it; the engine keeps every token's
  original angles (positions="original" on M-RoPE), so nothing else changes.
  transformers 5.x numbers text after the video from ``max(h, w)`` and computes the time in float;
  :func:`sharp.backbones.compat.adapt_model` gives the 5.x model 4.57's ``get_rope_index`` (text after
  the video's largest position, ``second_per_grid_t`` cast to int64 first), so both lines agree.
* lmms-eval ``qwen2_5_vl`` wrapper: ``max_num_frames=32``, ``min_pixels=256*28*28``,
  ``max_pixels=1605632`` (Qwen2-VL: 3136 / 602112), the same ChatML prompt with the system turn and
  the video before the text; it appends the last decoded frame when ``np.linspace`` missed it
  (never: the linspace endpoint is that frame), so frame selection equals Qwen2-VL's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from sharp.backbones import compat
from sharp.backbones import video as V
from sharp.backbones.base import register_backbone, register_family
from sharp.backbones.qwen2_vl import Qwen2VLBackbone

# lmms-eval 0.7.3 qwen2_5_vl wrapper defaults (lmms_eval/models/simple/qwen2_5_vl.py)
QWEN25VL_MIN_PIXELS = 256 * 28 * 28
QWEN25VL_MAX_PIXELS = 1605632
# Qwen2_5_VLProcessor: fps when none is passed (second_per_grid_ts = temporal_patch_size / fps)
QWEN25VL_PROCESSOR_FPS = 2.0


@register_family
class Qwen2_5_VLBackbone(Qwen2VLBackbone):
    family = "qwen2_5_vl"

    # -- HF classes ------------------------------------------------------------------------
    @classmethod
    def config_class(cls) -> type:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    # -- prompts / pixels --------------------------------------------------------------------
    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None,
                       second_per_grid_ts: Optional[torch.Tensor] = None) -> int:
        return super().n_placeholders(pixel_values_videos, video_grid_thw)

    def _pixel_limits(self) -> dict:
        return {"min_pixels": QWEN25VL_MIN_PIXELS, "max_pixels": QWEN25VL_MAX_PIXELS, **self.video_kwargs}

    def sample_frames(self, video) -> np.ndarray:
        vc = self.config.vision_config
        return V.qwen2vl_sample_frames(video, max_num_frames=self.num_frames, patch_size=vc.patch_size,
                                       merge_size=vc.spatial_merge_size, **self._pixel_limits())

    def video_pixels(self, frames: np.ndarray) -> dict:
        """Qwen2-VL's ``pixel_values_videos`` (t*h*w, 3*tps*p*p) and ``video_grid_thw`` (1, 3), plus
        ``second_per_grid_ts`` (1,) = temporal_patch_size / 2.0 (the processor's default fps)."""
        vc = self.config.vision_config
        limits = {k: v for k, v in self._pixel_limits().items() if k in ("min_pixels", "max_pixels")}
        pv, thw = V.qwen2vl_preprocess(frames, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                       temporal_patch_size=vc.temporal_patch_size, **limits)
        return {"pixel_values_videos": pv, "video_grid_thw": thw,
                "second_per_grid_ts": torch.tensor([vc.temporal_patch_size / QWEN25VL_PROCESSOR_FPS])}

    def collate_pixels(self, samples: Sequence[dict]) -> dict:
        out = super().collate_pixels(samples)
        default = torch.tensor([self.config.vision_config.temporal_patch_size / QWEN25VL_PROCESSOR_FPS])
        out["second_per_grid_ts"] = torch.cat([s.get("second_per_grid_ts", default) for s in samples])  # (b,)
        return out

    # -- vision tower ----------------------------------------------------------------------
    @property
    def full_attention_layers(self) -> list[int]:
        """Vision blocks that attend over a whole temporal patch (the rest attend inside windows)."""
        return list(self.config.vision_config.fullatt_block_indexes)

    def install_session_hooks(self, session) -> None:
        """Record the vision tower's ``grid_thw`` into every captured block call of this forward
        (the window permutation of :meth:`visual_features_to_tokens` is a function of it)."""
        def post(module, args, kwargs, output):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if session.prefill.active and grid is not None:
                for captured in session.prefill.state.vision_captured.values():
                    captured["grid_thw"] = grid

        if session.plan.vision_layers:
            session.add_hook(self.model.model.visual, post, pre=False)

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N / merge^2,) the model's own window index (4.57 ``visual.get_window_index``, 5.x
        ``vision_utils.get_vision_window_index``: :func:`sharp.backbones.compat.vision_window_index`): row
        group i of the tower holds merge group ``window_index[i]`` of the preprocessing order (sample after sample)."""
        index, _ = compat.vision_window_index(self.model.model.visual, grid_thw)
        return index

    def visual_features_to_tokens(self, per_patch: torch.Tensor, batch_size: int,
                                  grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tower rows (window order) -> LLM visual tokens: mean over each merge group of
        ``merge^2`` consecutive rows (the merger's group), then ``argsort(window_index)`` as
        ``Qwen2_5_VisionTransformerPretrainedModel.forward`` does after its merger.

        per_patch: (N, C) or (N,) in the tower's row order; grid_thw: (b, 3) of that call."""
        if grid_thw is None:
            raise ValueError(f"{self.name}: Qwen2.5-VL vision rows are in window order; pass the call's grid_thw")
        group = self._merge ** 2
        grouped = per_patch.reshape(-1, group, *per_patch.shape[1:]).mean(dim=1)  # (N/4, [C]) window order
        reverse = torch.argsort(self.window_index(grid_thw).to(grouped.device))
        tokens = grouped[reverse]  # (N/4, [C]) preprocessing (LLM) order
        return tokens.reshape(batch_size, -1, *per_patch.shape[1:])

    def _captured_token_layout(self, captured: dict) -> dict:
        """The window permutation of the captured call's ``grid_thw`` (``captured["grid_thw"]``, added
        by :meth:`install_session_hooks`), for :meth:`Backbone.vision_maps`."""
        grid = captured.get("grid_thw")
        if grid is None:
            raise ValueError(f"{self.name}: the captured vision block call has no grid_thw (install the "
                             "backbone's session hooks, or add captured['grid_thw'] = video_grid_thw)")
        return {"grid_thw": grid}


register_backbone("qwen2_5_vl_7b", family="qwen2_5_vl", hub="Qwen/Qwen2.5-VL-7B-Instruct",
                  config="qwen2_5_vl_7b.json", dtype=torch.bfloat16)
register_backbone("tiny_qwen2_5_vl", family="qwen2_5_vl", config="tiny_qwen2_5_vl.json", dtype=torch.float32,
                  video_kwargs=dict(min_pixels=3136, max_pixels=112 * 112))
