"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): 2-frame x 14 px patches, ViT with 2-D RoPE, 2x2 merger.

A video becomes ``video_grid_thw = (t, h, w)`` patches (t temporal patches of 2 frames); the
merger turns each 2x2 block of patches (4 consecutive pixel rows) into one LLM token, so
t x h x w / 4 tokens. The vision attention runs inside each temporal patch (``cu_seqlens``).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sharp.backbones import video as V
from sharp.backbones.base import CHATML_SYSTEM, Backbone, VisualLayout, register_family
from sharp.backbones.vision import FramePooling, RopeFn, captured_input, mean_query_attention

# lmms-eval's qwen2_vl wrapper: processor.apply_chat_template with the system turn and the video
# before the text in the user turn (the wrapper strips "<image>" from contexts).
_PROMPT = CHATML_SYSTEM + (
    "<|im_start|>user\n<|vision_start|>{visual}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")


@register_family
class Qwen2VLBackbone(Backbone):
    family = "qwen2_vl"

    # -- HF classes ------------------------------------------------------------------------
    @classmethod
    def config_class(cls) -> type:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def config_special_ids(cls, config) -> dict[str, int]:
        return {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    def frame_size(self) -> int:
        vc = self.config.vision_config
        return 2 * vc.patch_size * vc.spatial_merge_size

    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    # -- layout ----------------------------------------------------------------------------
    def _video_layout(self, inputs: dict) -> tuple[VisualLayout, int]:
        thw = inputs.get("video_grid_thw")
        if thw is None or inputs.get("pixel_values_videos") is None:
            raise ValueError(
                "inputs contain no visual tokens: pixel_values_videos / video_grid_thw are missing "
                "(pruning needs a video; images and text-only prompts are not supported)")
        if thw.shape[0] != inputs["input_ids"].shape[0]:
            raise ValueError("exactly one video per sample is supported (video_grid_thw rows != batch size)")
        if not bool((thw == thw[0]).all()):
            raise ValueError("all samples of a batch must share one video layout (video_grid_thw differs)")
        t, h, w = (int(x) for x in thw[0])
        gh, gw = h // self._merge, w // self._merge
        layout = VisualLayout(t * gh * gw, t, gh * gw, (gh, gw))
        return layout, layout.n_visual

    # -- prompts ---------------------------------------------------------------------------
    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None) -> int:
        """video_grid_thw (1, 3) -> t*h*w / merge^2."""
        return int(video_grid_thw[0].prod()) // (self._merge ** 2)

    def build_prompt(self, question: str, n_placeholders: int) -> str:
        return _PROMPT.format(visual="<|video_pad|>" * n_placeholders, question=question.replace("<image>", ""))

    # -- pixels ----------------------------------------------------------------------------
    def sample_frames(self, video: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
        vc = self.config.vision_config
        return V.qwen2vl_sample_frames(video, max_num_frames=self.num_frames, patch_size=vc.patch_size,
                                       merge_size=vc.spatial_merge_size, **self.video_kwargs)

    def visual_frame_indices(self, total_frames: int, fps: float) -> np.ndarray:
        idx = V.qwen2vl_frame_indices(total_frames, float(fps), max_num_frames=self.num_frames)
        tps = self.config.vision_config.temporal_patch_size
        if len(idx) % tps:  # the processor pads time by repeating the last frame
            idx = np.concatenate([idx, np.repeat(idx[-1:], tps - len(idx) % tps)])
        return idx.reshape(-1, tps)

    def video_pixels(self, frames: np.ndarray) -> dict:
        """``{"pixel_values_videos": (t*h*w, 3*tps*p*p), "video_grid_thw": (1, 3)}``."""
        vc = self.config.vision_config
        limits = {k: v for k, v in self.video_kwargs.items() if k in ("min_pixels", "max_pixels")}
        pv, thw = V.qwen2vl_preprocess(frames, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                       temporal_patch_size=vc.temporal_patch_size, **limits)
        return {"pixel_values_videos": pv, "video_grid_thw": thw}

    def collate_pixels(self, samples: Sequence[dict]) -> dict:
        return {"pixel_values_videos": torch.cat([s["pixel_values_videos"] for s in samples]),  # rows, sample after sample
                "video_grid_thw": torch.cat([s["video_grid_thw"] for s in samples])}  # (b, 3)

    def synthetic_frame_size(self) -> tuple[int, int]:
        return 2 * self.frame_size(), 2 * self.frame_size()

    def _black_pixels(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        pv, vc = pixel_values_videos, self.config.vision_config
        side = vc.patch_size * vc.spatial_merge_size
        black, _ = V.qwen2vl_preprocess(np.zeros((vc.temporal_patch_size, side, side, 3), np.uint8),
                                        patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                        temporal_patch_size=vc.temporal_patch_size,
                                        min_pixels=side * side, max_pixels=side * side)
        return black[:1].to(pv).expand_as(pv).contiguous()

    def vision_settings(self) -> dict:
        vc = self.config.vision_config
        return {"patch_size": vc.patch_size, "merge": vc.spatial_merge_size, "temporal": vc.temporal_patch_size}

    def pixel_mean_std(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        # (N, 3 * tps * p * p): channel-major columns
        per = shape[1] // 3
        mean = np.repeat(np.asarray(V.OPENAI_CLIP_MEAN, np.float32), per).reshape(1, -1)
        std = np.repeat(np.asarray(V.OPENAI_CLIP_STD, np.float32), per).reshape(1, -1)
        return mean, std

    # -- vision tower ----------------------------------------------------------------------
    @classmethod
    def vision_depth(cls, vision_config: dict) -> int:
        return int(vision_config["depth"])  # ViT blocks

    @property
    def vision_layers(self) -> torch.nn.ModuleList:
        return self.model.model.visual.blocks

    @property
    def feature_layer(self) -> int:
        """The last block: the merger reads its output."""
        return len(self.vision_layers) - 1

    def visual_features_to_tokens(self, per_patch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The merger's grouping: merge^2 consecutive patch rows (merge-block order of the
        preprocessing) -> one LLM token, mean over the group; rows sample after sample."""
        group = self._merge ** 2
        if per_patch.dim() == 1:
            return per_patch.reshape(batch_size, -1, group).mean(dim=-1)
        return per_patch.reshape(batch_size, -1, group, per_patch.shape[-1]).mean(dim=2)

    def _vision_qk(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, attn.num_heads, -1)  # (N, 3, heads, head_dim)
        return qkv[:, 0], qkv[:, 1]

    def _vision_chunks(self, captured: dict, n_rows: int) -> list[int]:
        cu = (captured.get("kwargs") or {}).get("cu_seqlens")
        if cu is None:
            raise ValueError("captured Qwen2-VL vision block call has no cu_seqlens keyword")
        return (cu[1:] - cu[:-1]).tolist()

    def _vision_scale(self, block: torch.nn.Module) -> float:
        return block.attn.scaling

    def _vision_rope(self, block: torch.nn.Module, captured: dict) -> Optional[RopeFn]:
        """The block's own ``apply_rotary_pos_emb_vision`` with the captured ``position_embeddings``."""
        kwargs = captured.get("kwargs") or {}
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
        elif kwargs.get("rotary_pos_emb") is not None:  # older transformers: the angles
            emb = torch.cat((kwargs["rotary_pos_emb"], kwargs["rotary_pos_emb"]), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        else:
            raise ValueError("captured Qwen2-VL vision block call has no position_embeddings keyword")
        apply = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision

        def rope(q: torch.Tensor, k: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            return apply(q, k, cos[start:end], sin[start:end])

        return rope

    # -- per-frame pooling (FastVID) -------------------------------------------------------------
    @torch.no_grad()
    def frame_pooling(self, layer: int, captured: dict, batch_size: int) -> FramePooling:
        """FastVID's Qwen2.5-VL saliency (its ``Qwen2_5_VLVisionFlashAttention2`` with ``grid_thw``, last
        block): per chunk of the captured call (on the last block: one temporal patch), the mean RoPE'd
        query attends to each merge group's mean RoPE'd key, softmax over the groups, mean over heads;
        mapped onto the LLM tokens. No pooling head: ``global_features`` is None (FastVID takes the mean
        of each temporal patch's merged embeddings)."""
        block = self.vision_layers[self.resolve_vision_layer(layer)]
        q, k = self._vision_qk(block, captured_input(captured))  # (N, heads, head_dim)
        group = self._merge ** 2
        per_group = mean_query_attention(q, k, self._vision_scale(block), self._vision_chunks(captured, q.shape[0]),
                                         group, rope=self._vision_rope(block, captured))  # (N / group,)
        rows = per_group.repeat_interleave(group)  # each row carries its group's value: the mapping keeps it
        attention = self.visual_features_to_tokens(rows, batch_size, **self._captured_token_layout(captured))
        return FramePooling(global_features=None, attention=attention.float(),
                            source=f"last-block mean-query attention (vision block {self.resolve_vision_layer(layer)})")
