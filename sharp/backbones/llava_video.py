"""LLaVA-Video-7B-Qwen2 in its HF-converted form (``llava-hf/LLaVA-Video-7B-Qwen2-hf``): the
``LlavaOnevisionForConditionalGeneration`` class with LLaVA-OneVision's architecture (SigLIP-so400m
384 px, patch 14, Qwen2-7B LM), so this family extends :class:`LlavaOneVisionBackbone`.

What differs from LLaVA-OneVision, and how it is handled:

* Frames: lmms-eval's ``llava_vid`` wrapper (``lmms_eval/models/simple/llava_vid.py``
  ``load_video``) with the LLaVA-Video model card's arguments (``max_frames_num=64``,
  ``conv_template=qwen_1_5``) reads one frame per second (``range(0, total, round(avg_fps / 1))``)
  and, when that is more than 64 frames, ``np.linspace(0, total - 1, 64, dtype=int)``: up to 64
  frames (LLaVA-OV: always 32 uniform). :meth:`sample_frames` / :meth:`visual_frame_indices` do the
  same; a frames array (no frame rate) gets 64 uniform frames.
* Pooling and newline: the ORIGINAL LLaVA-NeXT code under ``llava_vid`` pools 2x2 with
  ``mm_spatial_pool_mode`` (the card: ``average``, 27 -> 13: 169 tokens per frame) and adds one
  ``image_newline`` per grid row (``mm_newline_position=grid``: 13 per frame). The HF class has
  neither option: ``LlavaOnevisionModel.get_video_features`` always pools bilinearly to
  ceil(27 / 2) = 14 (196 tokens per frame) and appends ONE ``image_newline`` per video. The
  HF-converted checkpoint run through transformers therefore has OV's layout (64 x 196 + 1 =
  12545 placeholders), and that is the layout this family describes (``_video_layout`` and
  ``visual_mask`` inherited); the numbers of the original code path are not reproduced.
* Prompt: ``qwen_1_5`` conversation = the same ChatML with the system turn and ``<image>\\n`` +
  question (``add_time_instruction`` off, the wrapper's default), i.e. OV's prompt.
* Preprocessing: the same SigLIP processor (384 px resize, mean/std 0.5).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch

from sharp.backbones import video as V
from sharp.backbones.base import register_backbone, register_family
from sharp.backbones.llava_onevision import LlavaOneVisionBackbone

LLAVA_VID_FPS = 1  # llava_vid ``video_fps`` default: frames read per second before the cap


def llava_vid_frame_indices(total_frames: int, avg_fps: float, max_frames: int = 64,
                            video_fps: int = LLAVA_VID_FPS) -> np.ndarray:
    """lmms-eval ``llava_vid.load_video`` frame indices: one per ``round(avg_fps / video_fps)``
    frames, or ``np.linspace(0, total - 1, max_frames, dtype=int)`` when that gives more than
    ``max_frames``. Returns (K,) int64, K <= max_frames."""
    step = max(1, round(avg_fps / video_fps))  # the wrapper's ``fps`` (0 would stall its range)
    idx = np.arange(0, total_frames, step)
    if len(idx) > max_frames:
        idx = np.linspace(0, total_frames - 1, max_frames, dtype=int)
    return idx.astype(np.int64)


@register_family
class LlavaVideoBackbone(LlavaOneVisionBackbone):
    family = "llava_video"

    def sample_frames(self, video: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
        """Frames as lmms-eval's ``llava_vid`` reads them (1 fps, at most ``num_frames`` = 64)."""
        if isinstance(video, (np.ndarray, torch.Tensor)):
            return V.load_frames_uniform(video, self.num_frames, strict=False)
        vr = V._open_decord(video)
        idx = llava_vid_frame_indices(len(vr), float(vr.get_avg_fps()), self.num_frames)
        return V._decord_get_batch(vr, idx.tolist(), video)

    def visual_frame_indices(self, total_frames: int, fps: float) -> np.ndarray:
        return llava_vid_frame_indices(total_frames, float(fps), self.num_frames)[:, None]


register_backbone("llava_video_7b", family="llava_video", hub="llava-hf/LLaVA-Video-7B-Qwen2-hf",
                  config="llava_video_7b.json", dtype=torch.bfloat16, num_frames=64)
register_backbone("tiny_llava_video", family="llava_video", config="tiny_llava_video.json", dtype=torch.float32,
                  num_frames=8)
