"""Backbones: layouts, real video files through prepare() + generate(), clear input errors."""
import numpy as np
import pytest

import sharp
from sharp.backbones.video import VideoError, write_video


@pytest.fixture(scope="module", params=["tiny_llava_onevision", "tiny_qwen2_vl"])
def bb(request):
    return sharp.load_backbone(request.param)


def _colour_video(path, frames=40, h=64, w=96):
    g = np.random.default_rng(0)
    x = np.zeros((frames, h, w, 3), np.uint8)
    for t in range(frames):
        x[t] = g.integers(0, 256, size=3, dtype=np.uint8)
    return write_video(path, x, fps=8)


def test_layout_matches_placeholders(bb):
    inputs = bb.synthetic_inputs(frames=8)
    layout = bb.layout(inputs)
    vis = bb.visual_mask(inputs["input_ids"], layout)
    assert int(vis.sum()) == layout.n_visual == layout.frames * layout.tokens_per_frame
    assert layout.grid[0] * layout.grid[1] == layout.tokens_per_frame
    # LLaVA-OV: 56px / patch 7 -> 8x8 -> pooled 4x4; Qwen2-VL: 4 temporal patches of 2 frames, 112px -> 4x4
    assert (layout.frames, layout.tokens_per_frame) == {"tiny_llava_onevision": (8, 16), "tiny_qwen2_vl": (4, 16)}[bb.name]


def test_mp4_through_prepare_and_generate(bb, tmp_path):
    path = _colour_video(tmp_path / "v.mp4")
    bb.num_frames = 8
    inputs = bb.prepare(str(path), "What colour is the video?")
    layout = bb.layout(inputs)
    assert layout.n_visual > 0
    with sharp.prune(bb, "fastv", 0.5) as trace:
        out = bb.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(trace.kept[0][0]) == round(0.5 * layout.n_visual)
    text = bb.tokenizer.decode(inputs["input_ids"][0])
    assert "What colour is the video?" in text and text.startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_corrupt_and_missing_video(bb, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="bad.mp4"):
        bb.prepare(str(bad), "q")
    with pytest.raises(VideoError, match="missing.mp4"):
        bb.prepare(str(tmp_path / "missing.mp4"), "q")


def test_too_few_frames_for_llava_repeat_as_lmms_eval_does(tmp_path):
    bb = sharp.load_backbone("tiny_llava_onevision")
    path = _colour_video(tmp_path / "short.mp4", frames=5)
    inputs = bb.prepare(str(path), "q")  # 32 frames asked of 5: uniform indices with repeats
    assert bb.layout(inputs).frames == 32


def test_byte_tokenizer_roundtrip(bb):
    placeholder = {"tiny_llava_onevision": "<video>", "tiny_qwen2_vl": "<|video_pad|>"}[bb.name]
    text = f"héllo {placeholder} wörld"
    ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bb.video_token_id in ids
    assert bb.tokenizer.decode(ids) == text


def test_random_weight_7b_configs_are_the_published_sizes():
    from sharp.flops import lm_dims
    for name in ("llava_onevision_7b", "qwen2_vl_7b"):
        d = lm_dims(name)
        assert (d.num_layers, d.hidden, d.ffn, d.heads, d.kv_heads) == (28, 3584, 18944, 28, 4)


def test_prompts_follow_lmms_eval_wrappers():
    llava = sharp.load_backbone("tiny_llava_onevision")
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert llava.build_prompt("Q?", 2) == head + "<video><video>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    # a context that already holds <image> places the video there (no second placeholder)
    assert llava.build_prompt("A\n<image>\nQ?", 1) == head + "A\n<video>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    qwen = sharp.load_backbone("tiny_qwen2_vl")
    assert qwen.build_prompt("<image>Q?", 1) == (
        head + "<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")


def test_family_classes_and_registry():
    from sharp.backbones import (FAMILIES, Backbone, LlavaOneVisionBackbone, Qwen2VLBackbone, backbone_family,
                                 family_class)

    assert FAMILIES["llava_onevision"] is LlavaOneVisionBackbone and FAMILIES["qwen2_vl"] is Qwen2VLBackbone
    expected = {"llava_onevision_7b": "llava_onevision", "tiny_llava_onevision": "llava_onevision",
                "mid_llava_onevision": "llava_onevision", "toy_llava_onevision": "llava_onevision",
                "qwen2_vl_7b": "qwen2_vl", "tiny_qwen2_vl": "qwen2_vl", "mid_qwen2_vl": "qwen2_vl",
                "toy_qwen2_vl": "qwen2_vl", "toy_scenes_llava_onevision": "llava_onevision",
                "toy_scenes_qwen2_vl": "qwen2_vl",
                # the newer families (tests/test_new_backbones.py)
                "llava_video_7b": "llava_video", "tiny_llava_video": "llava_video",
                "qwen2_5_vl_7b": "qwen2_5_vl", "tiny_qwen2_5_vl": "qwen2_5_vl",
                "qwen3_vl_8b": "qwen3_vl", "tiny_qwen3_vl": "qwen3_vl"}
    assert {n: backbone_family(n) for n in sharp.backbone_names()} == expected
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        backbone_family("nope")
    with pytest.raises(ValueError, match="unknown backbone family"):
        family_class("nope")
    for name, cls in (("tiny_llava_onevision", LlavaOneVisionBackbone), ("tiny_qwen2_vl", Qwen2VLBackbone)):
        bb = sharp.load_backbone(name)
        assert type(bb) is cls and bb.kind == bb.family == cls.family == backbone_family(name)
        assert isinstance(bb.model, cls.model_class()) and isinstance(bb.config, cls.config_class())
    with pytest.raises(TypeError):
        Backbone(name="x", model=None, tokenizer=None)  # abstract: families implement the details


def test_register_family_rejects_duplicates():
    from sharp.backbones import LlavaOneVisionBackbone, register_family

    class Other(LlavaOneVisionBackbone):
        pass  # inherits family "llava_onevision"

    with pytest.raises(ValueError, match="already registered"):
        register_family(Other)
    Other.family = ""
    with pytest.raises(ValueError, match="set the class attribute"):
        register_family(Other)

