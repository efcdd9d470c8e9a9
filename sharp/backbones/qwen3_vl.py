"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): 16-px patches, DeepStack, interleaved M-RoPE, timestamps.

What differs from Qwen2-VL (``qwen2_vl.py``, which this class extends) and how it is handled
(sources: transformers 4.57 ``models/qwen3_vl/{modeling,processing,video_processing}_qwen3_vl.py``,
lmms-eval 0.7.3 ``models/simple/qwen3_vl.py``):

* Vision tower: patch 16 (a merged token covers 32 x 32 px), learned position embeddings
  interpolated to the grid, every block full attention inside each temporal patch
  (``cu_seqlens``), rows in the preprocessing's merge-block order (no window permutation), so
  Qwen2-VL's grouping maps rows to tokens. Normalisation mean = std = 0.5 (Qwen3-VL processor).
* DeepStack: the tower also returns the outputs of blocks ``deepstack_visual_indexes`` (8B: 8, 16,
  24) through their own mergers, one row per visual token; ``Qwen3VLTextModel`` adds list item i to
  the visual rows of decoder layer i's output (layers 0, 1, 2). :meth:`install_session_hooks`
  takes this over during a pruning session (:class:`sharp.engine.deepstack.VisualInjection`): the
  features of a pruned visual token are dropped with it and the kept tokens get exactly their own.
  On transformers 5.x the text model's call is the same (``deepstack_visual_embeds``,
  ``visual_pos_masks``); only ``get_video_features`` returns a ModelOutput
  (``tests/compat_helpers.py``: ``qwen3vl_video_features`` gives 4.57's tuple).
* LLM positions: M-RoPE with the (t, h, w) sections INTERLEAVED over the frequencies
  (``mrope_interleaved``; ``Qwen3VLTextRotaryEmbedding`` returns (b, s, head_dim) cos/sin already
  merged, so the layer applies plain ``apply_rotary_pos_emb``). ``get_rope_index`` splits a video
  into its temporal patches (t = 1 each): time is carried by TEXT timestamps, not by the temporal
  position index. Attention has q_norm / k_norm (RMSNorm per head) before RoPE.
  On 5.x :func:`sharp.backbones.compat.adapt_model` gives the model 4.57's ``get_rope_index``
  (the same positions for real tokens; padding 1 and deltas against the padded length, as 4.57).
* Prompt (``Qwen3VLProcessor.__call__``): the video is ``<{t:.1f} seconds><|vision_start|>`` +
  the patch's ``<|video_pad|>`` tokens + ``<|vision_end|>`` per temporal patch, t = the mean time of
  the patch's two frames (``_calculate_timestamps``: frame index / video fps). The visual tokens
  are therefore NOT contiguous (text between temporal patches); the engine only needs the mask.
  Timestamps ride along with the frames (:class:`TimedFrames`) and the placeholder count
  (:class:`VideoSlots`); frames without a frame rate get the processor's fallback (fps 24, frame
  indices 0..T-1).
* Frames (lmms-eval ``qwen3_vl``, defaults): ``nframes = 32`` (qwen-vl-utils:
  ``linspace(0, total - 1, 32).round()``, at most the video's frames), resized by qwen-vl-utils with
  factor 32 and ``min_pixels = 256*28*28``, ``max_pixels = 1605632``; the processor then runs with
  ``do_resize=False``. The per-frame pixel cap reuses ``video.qwen2vl_video_pixel_limits`` (the
  qwen-vl-utils total-pixel budget with factor 32); the qwen-vl-utils release that lmms-eval pulls
  in for Qwen3-VL was not available here to check it against.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sharp.backbones import video as V
from sharp.backbones.base import CHATML_SYSTEM, register_backbone, register_family
from sharp.backbones.qwen2_vl import Qwen2VLBackbone

# lmms-eval 0.7.3 qwen3_vl wrapper defaults
QWEN3VL_MIN_PIXELS = 256 * 28 * 28
QWEN3VL_MAX_PIXELS = 1605632
QWEN3VL_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL video processor image_mean / image_std
QWEN3VL_STD = (0.5, 0.5, 0.5)
QWEN3VL_FALLBACK_FPS = 24.0  # Qwen3VLProcessor when the video metadata has no fps

_PROMPT = CHATML_SYSTEM + "<|im_start|>user\n{visual}{question}<|im_end|>\n<|im_start|>assistant\n"


class TimedFrames(np.ndarray):
    """(T, H, W, 3) uint8 frames that remember their time in the video (``seconds``, (T,) float)."""

    seconds: Optional[np.ndarray] = None

    def __new__(cls, frames: np.ndarray, seconds: Optional[np.ndarray]):
        out = np.asarray(frames).view(cls)
        out.seconds = None if seconds is None else np.asarray(seconds, np.float64)
        return out

    def __array_finalize__(self, obj):
        self.seconds = getattr(obj, "seconds", None)


class VideoSlots(int):
    """A placeholder count that carries the temporal patches' timestamps (seconds) for the prompt."""

    timestamps: tuple = ()

    def __new__(cls, n: int, timestamps: Sequence[float]):
        out = super().__new__(cls, n)
        out.timestamps = tuple(float(t) for t in timestamps)
        return out


def patch_timestamps(seconds: np.ndarray, temporal_patch_size: int) -> list[float]:
    """``Qwen3VLProcessor._calculate_timestamps``: pad to a multiple of the patch by repeating the
    last frame, then the mean of each patch's first and last frame times."""
    s = list(np.asarray(seconds, np.float64))
    while len(s) % temporal_patch_size:
        s.append(s[-1])
    return [(s[i] + s[i + temporal_patch_size - 1]) / 2 for i in range(0, len(s), temporal_patch_size)]


@register_family
class Qwen3VLBackbone(Qwen2VLBackbone):
    family = "qwen3_vl"

    # -- HF classes ------------------------------------------------------------------------
    @classmethod
    def config_class(cls) -> type:
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    # -- prompts ---------------------------------------------------------------------------
    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None,
                       video_timestamps: Optional[torch.Tensor] = None) -> int:
        """t*h*w / merge^2, as a :class:`VideoSlots` carrying the temporal patches' timestamps."""
        n = super().n_placeholders(pixel_values_videos, video_grid_thw)
        t = int(video_grid_thw[0, 0])
        stamps = video_timestamps.tolist() if video_timestamps is not None else patch_timestamps(
            np.arange(t * self.config.vision_config.temporal_patch_size) / QWEN3VL_FALLBACK_FPS,
            self.config.vision_config.temporal_patch_size)
        return VideoSlots(n, stamps)

    def build_prompt(self, question: str, n_placeholders: int) -> str:
        stamps = getattr(n_placeholders, "timestamps", ()) or ()
        if not stamps:
            raise ValueError(f"{self.name}: the Qwen3-VL prompt needs the temporal patches' timestamps; pass "
                             "n_placeholders from bb.n_placeholders(**bb.video_pixels(frames))")
        per = int(n_placeholders) // len(stamps)
        visual = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per + "<|vision_end|>"
                         for t in stamps)
        return _PROMPT.format(visual=visual, question=question.replace("<image>", ""))

    # -- pixels ----------------------------------------------------------------------------
    def _pixel_limits(self) -> dict:
        return {"min_pixels": QWEN3VL_MIN_PIXELS, "max_pixels": QWEN3VL_MAX_PIXELS, **self.video_kwargs}

    def frame_indices(self, total_frames: int) -> np.ndarray:
        """qwen-vl-utils ``nframes`` mode: ``linspace(0, total - 1, n).round()``, n = num_frames capped
        at the video's frames (lmms-eval) and rounded to an even count."""
        n = max(2, round(min(self.num_frames, total_frames) / 2) * 2)
        return torch.linspace(0, total_frames - 1, n).round().long().numpy()

    def sample_frames(self, video: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
        if isinstance(video, (np.ndarray, torch.Tensor)):
            frames = np.asarray(video)
            idx = self.frame_indices(frames.shape[0])
            return TimedFrames(frames[idx], getattr(video, "seconds", None))
        vr = V._open_decord(video)
        idx = self.frame_indices(len(vr))
        frames = V._decord_get_batch(vr, idx.tolist(), video)
        vc = self.config.vision_config
        limits = self._pixel_limits()
        lo, hi = V.qwen2vl_video_pixel_limits(len(idx), limits["min_pixels"], limits["max_pixels"],
                                              patch_size=vc.patch_size, merge_size=vc.spatial_merge_size)
        h, w = frames.shape[1:3]
        rh, rw = V.qwen2vl_smart_resize(h, w, vc.patch_size * vc.spatial_merge_size, lo, hi, flavor="qwen_vl_utils")
        if (rh, rw) != (h, w):
            frames = V._resize_bicubic_aa_uint8(frames, (rh, rw))
        return TimedFrames(frames, idx / float(vr.get_avg_fps()))

    def visual_frame_indices(self, total_frames: int, fps: float) -> np.ndarray:
        idx = self.frame_indices(total_frames)
        tps = self.config.vision_config.temporal_patch_size
        if len(idx) % tps:
            idx = np.concatenate([idx, np.repeat(idx[-1:], tps - len(idx) % tps)])
        return idx.reshape(-1, tps)

    def video_pixels(self, frames: np.ndarray) -> dict:
        """``pixel_values_videos`` (t*h*w, 3*tps*16*16), ``video_grid_thw`` (1, 3) and
        ``video_timestamps`` (t,) seconds (prompt only; :meth:`collate_pixels` leaves it out)."""
        vc = self.config.vision_config
        limits = {k: v for k, v in self._pixel_limits().items() if k in ("min_pixels", "max_pixels")}
        pv, thw = V.qwen2vl_preprocess(frames, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                       temporal_patch_size=vc.temporal_patch_size, image_mean=QWEN3VL_MEAN,
                                       image_std=QWEN3VL_STD, **limits)
        seconds = getattr(frames, "seconds", None)
        if seconds is None:  # the processor's fallback: fps 24 over frame indices 0..T-1
            seconds = np.arange(len(frames)) / QWEN3VL_FALLBACK_FPS
        stamps = patch_timestamps(seconds, vc.temporal_patch_size)
        return {"pixel_values_videos": pv, "video_grid_thw": thw, "video_timestamps": torch.tensor(stamps)}

    def collate_pixels(self, samples: Sequence[dict]) -> dict:
        return {"pixel_values_videos": torch.cat([s["pixel_values_videos"] for s in samples]),
                "video_grid_thw": torch.cat([s["video_grid_thw"] for s in samples])}

    def _black_pixels(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        pv, vc = pixel_values_videos, self.config.vision_config
        side = vc.patch_size * vc.spatial_merge_size
        black, _ = V.qwen2vl_preprocess(np.zeros((vc.temporal_patch_size, side, side, 3), np.uint8),
                                        patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                        temporal_patch_size=vc.temporal_patch_size, image_mean=QWEN3VL_MEAN,
                                        image_std=QWEN3VL_STD, min_pixels=side * side, max_pixels=side * side)
        return black[:1].to(pv).expand_as(pv).contiguous()

    def pixel_mean_std(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        per = shape[1] // 3
        mean = np.repeat(np.asarray(QWEN3VL_MEAN, np.float32), per).reshape(1, -1)
        std = np.repeat(np.asarray(QWEN3VL_STD, np.float32), per).reshape(1, -1)
        return mean, std

    # -- DeepStack -------------------------------------------------------------------------
    @property
    def deepstack_layers(self) -> list[int]:
        """Decoder layers whose OUTPUT gets DeepStack features (0 .. len(deepstack_visual_indexes) - 1)."""
        return list(range(len(self.config.vision_config.deepstack_visual_indexes)))

    def install_session_hooks(self, session) -> None:
        """Move DeepStack's injection onto the kept visual tokens (see :mod:`sharp.engine.deepstack`):
        a pre-hook on the text model takes ``deepstack_visual_embeds`` (list of (N_vis_total, d),
        rows sample after sample) out of its call, reshaped to (b, n_visual, d) per layer."""
        from sharp.engine.deepstack import VisualInjection

        injection = VisualInjection(session)

        def pre(module, args, kwargs):
            embeds = kwargs.get("deepstack_visual_embeds")
            if embeds is None:
                injection.set(None)
                return None
            masks = kwargs.get("visual_pos_masks")  # (b, s) bool
            b = masks.shape[0]
            counts = masks.sum(dim=1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(f"{self.name}: DeepStack rows differ per sample; one video per sample is supported")
            injection.set([e.reshape(b, int(counts[0]), e.shape[-1]) for e in embeds])
            return args, dict(kwargs, deepstack_visual_embeds=None)

        session.add_hook(self.language_model, pre)
        injection.install(self.layers[: len(self.deepstack_layers)])


register_backbone("qwen3_vl_8b", family="qwen3_vl", hub="Qwen/Qwen3-VL-8B-Instruct", config="qwen3_vl_8b.json",
                  dtype=torch.bfloat16)
register_backbone("tiny_qwen3_vl", family="qwen3_vl", config="tiny_qwen3_vl.json", dtype=torch.float32,
                  video_kwargs=dict(min_pixels=1024, max_pixels=128 * 128))
