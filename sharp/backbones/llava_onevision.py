"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP per frame, 2x2 bilinear pooling.

A video of T frames becomes T x ceil(side/2)^2 LLM tokens (7B: 27x27 patches -> 14x14 = 196 per
frame) followed by one ``image_newline`` token, which the engine treats as text.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sharp.backbones import compat
from sharp.backbones import video as V
from sharp.backbones.base import CHATML_SYSTEM, Backbone, VisualLayout, register_family
from sharp.backbones.vision import (RANDOM_HEAD_SEED, SIGLIP_HEAD_HUB, FramePooling, SiglipPoolingHead,
                                    captured_output, hub_pooling_head, random_pooling_head)

# lmms-eval's llava_onevision wrapper: LLaVA-NeXT conv template "qwen_1_5" (ChatML), "<image>\n" +
# context as the user turn (the video's placeholders replace "<image>").
_PROMPT = CHATML_SYSTEM + "<|im_start|>user\n{visual}\n{question}<|im_end|>\n<|im_start|>assistant\n"


@register_family
class LlavaOneVisionBackbone(Backbone):
    family = "llava_onevision"
    video_newline = True  # one image_newline after each video's visual tokens (a text row to the engine)

    # -- HF classes ------------------------------------------------------------------------
    @classmethod
    def config_class(cls) -> type:
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig

    @classmethod
    def model_class(cls) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def config_special_ids(cls, config) -> dict[str, int]:
        return {"<image>": config.image_token_index, "<video>": config.video_token_index}

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_index

    def frame_size(self) -> int:
        return self.config.vision_config.image_size

    # -- layout ----------------------------------------------------------------------------
    def _patch_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def _pooled_side(self) -> int:
        return math.ceil(self._patch_side() / 2)  # 2x2 bilinear pooling, ceil as in HF apply_pooling

    def _video_layout(self, inputs: dict) -> tuple[VisualLayout, int]:
        pv = inputs.get("pixel_values_videos")
        if pv is None:
            raise ValueError(
                "inputs contain no visual tokens: pixel_values_videos is missing (pruning needs a video; "
                "images and text-only prompts are not supported)")
        frames, side = pv.shape[1], self._pooled_side()
        layout = VisualLayout(frames * side * side, frames, side * side, (side, side))
        return layout, layout.n_visual + 1  # + one image_newline per video

    def visual_mask(self, input_ids: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
        """(b, s) bool: the layout's visual tokens; the trailing image_newline counts as text."""
        is_video = input_ids == self.video_token_id
        rank = is_video.long().cumsum(dim=1)  # the last placeholder of each sample is the image_newline
        return is_video & (rank <= layout.n_visual)

    # -- prompts ---------------------------------------------------------------------------
    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None) -> int:
        """(T, 3, S, S) -> T x pooled side^2 + 1 image_newline."""
        return pixel_values_videos.shape[0] * self._pooled_side() ** 2 + 1

    def build_prompt(self, question: str, n_placeholders: int) -> str:
        visual = "<video>" * n_placeholders
        if "<image>" in question:  # the wrapper then lets the context place the visual token
            return _PROMPT.replace("{visual}\n", "").format(question=question.replace("<image>", visual, 1))
        return _PROMPT.format(visual=visual, question=question)

    # -- pixels ----------------------------------------------------------------------------
    def sample_frames(self, video: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
        return V.load_frames_uniform(video, self.num_frames, strict=False)  # short videos: repeats, as lmms-eval

    def visual_frame_indices(self, total_frames: int, fps: float) -> np.ndarray:
        return V.uniform_frame_indices(total_frames, self.num_frames)[:, None]

    def video_pixels(self, frames: np.ndarray) -> dict:
        """``{"pixel_values_videos": (T, 3, S, S)}``: SigLIP preprocessing at the tower's image size."""
        return {"pixel_values_videos": V.siglip_preprocess(frames, image_size=self.config.vision_config.image_size)}

    def collate_pixels(self, samples: Sequence[dict]) -> dict:
        return {"pixel_values_videos": torch.stack([s["pixel_values_videos"] for s in samples])}  # (b, T, 3, S, S)

    def synthetic_frame_size(self) -> tuple[int, int]:
        return self.frame_size(), self.frame_size()

    def _black_pixels(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        pv = pixel_values_videos
        black = V.siglip_preprocess(np.zeros((1, 8, 8, 3), np.uint8), image_size=pv.shape[-1])[0]  # (3, H, W)
        return black.to(pv).view(1, 1, *black.shape).expand_as(pv).contiguous()

    def vision_settings(self) -> dict:
        vc = self.config.vision_config
        return {"image_size": vc.image_size, "patch_size": vc.patch_size}

    def pixel_mean_std(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        # (T, 3, S, S): per channel
        mean = np.asarray(V.SIGLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(V.SIGLIP_STD, np.float32).reshape(1, 3, 1, 1)
        return mean, std

    # -- vision tower ----------------------------------------------------------------------
    @classmethod
    def vision_depth(cls, vision_config: dict) -> int:
        return int(vision_config["num_hidden_layers"])  # SigLIP encoder layers

    @property
    def vision_layers(self) -> torch.nn.ModuleList:
        return compat.siglip_encoder(self.model.model.vision_tower).layers

    @property
    def feature_layer(self) -> int:
        """``config.vision_feature_layer`` as a layer index: HF selects ``hidden_states[v]`` of the
        tower, where ``hidden_states[0]`` is the embeddings and ``hidden_states[i]`` the output of
        layer ``i - 1``; so v >= 1 -> layer v - 1, v < 0 -> layer n + v (-1: the last)."""
        v, n = self.config.vision_feature_layer, len(self.vision_layers)
        if not isinstance(v, int):
            raise ValueError(f"{self.name}: vision_feature_layer {v!r} concatenates several layers; "
                             "vision maps need one layer")
        layer = v - 1 if v >= 0 else n + v
        if not 0 <= layer < n:
            raise ValueError(f"{self.name}: vision_feature_layer {v} selects the patch embeddings, not a layer")
        return layer

    def visual_features_to_tokens(self, per_patch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Each frame's side x side patch grid -> the pooled grid with the model's own
        ``apply_pooling`` (bilinear to ceil(side/2)), every channel; frames sample-major."""
        flat = per_patch.dim() == 1
        x = per_patch[:, None] if flat else per_patch
        patches = self._patch_side() ** 2
        pooled = self.model.model.apply_pooling(x.reshape(-1, patches, x.shape[-1]))  # (b*T, side'^2, C)
        out = pooled.reshape(batch_size, -1, x.shape[-1])  # (b, T*side'^2, C)
        return out[..., 0] if flat else out

    def _vision_qk(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.self_attn
        h = block.layer_norm1(x.reshape(-1, x.shape[-1]))  # (b*T*P, d): every frame's patches, row by row
        shape = (h.shape[0], attn.num_heads, attn.head_dim)
        return attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)

    def vision_qk_capture(self, block: torch.nn.Module):
        """SigLIP's ``q_proj`` and ``k_proj`` of the layer (run on ``layer_norm1`` of its input, as
        :meth:`_vision_qk`): their outputs (b*T, P, d) viewed as (b*T*P, heads, head_dim)."""
        attn = block.self_attn

        def combine(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (-1, attn.num_heads, attn.head_dim)
            return q.reshape(shape), k.reshape(shape)

        return [attn.q_proj, attn.k_proj], combine

    def _vision_chunks(self, captured: dict, n_rows: int) -> list[int]:
        patches = self._patch_side() ** 2
        if n_rows % patches:
            raise ValueError(f"{n_rows} vision rows are not whole frames of {patches} patches")
        return [patches] * (n_rows // patches)

    def _vision_scale(self, block: torch.nn.Module) -> float:
        return block.self_attn.scale

    # -- per-frame pooling (FastVID) -------------------------------------------------------------
    def pooling_head(self) -> tuple[SiglipPoolingHead, str]:
        """(head, source): SigLIP's post_layernorm + attention-pooling head, which the LLaVA towers drop.
        Pretrained backbones (``pretrained``: a hub checkpoint) reload it from google/siglip-so400m-patch14-384
        as FastVID's SigLipVisionAbstract does; the others get a random head of the tower's width (seed 0).
        Built once per backbone, in the tower's dtype and device."""
        cached = self.__dict__.get("_pooling_head")
        if cached is None:
            vc = self.config.vision_config
            if self.pretrained:
                head, source = hub_pooling_head(vc), SIGLIP_HEAD_HUB
            else:
                head, source = random_pooling_head(vc), f"random (seed {RANDOM_HEAD_SEED})"
            tower = self.vision_layers[0].self_attn.q_proj.weight
            cached = (head.to(device=tower.device, dtype=tower.dtype).eval().requires_grad_(False), source)
            self.__dict__["_pooling_head"] = cached
        return cached

    @torch.no_grad()
    def frame_pooling(self, layer: int, captured: dict, batch_size: int) -> FramePooling:
        """The pooling head on each frame's output of vision layer ``layer`` (FastVID: the feature layer,
        before pooling: 729 patches per frame on the 7B): g_t the pooled output, a_t the probe attention
        (head mean) mapped like the features (bilinear 27 -> 14, FastVID llava_arch.get_attn_2dPool)."""
        out = captured_output(captured)
        out = out.reshape(-1, self._patch_side() ** 2, out.shape[-1])  # (b*T, P, d_vis)
        head, source = self.pooling_head()
        pooled, attention = head(out)  # (b*T, d_vis), (b*T, P)
        return FramePooling(global_features=pooled.float().reshape(batch_size, -1, pooled.shape[-1]),
                            attention=self.visual_features_to_tokens(attention.float().reshape(-1), batch_size),
                            source=source)
