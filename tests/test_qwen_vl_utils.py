"""Qwen frame sampling and sizes through qwen-vl-utils (what lmms-eval's Qwen wrappers call) equal today's.

``sharp.backbones.video`` calls qwen-vl-utils' ``smart_nframes`` / ``smart_resize`` where it imports
(``qwen_vl_utils_module``: it needs a torchvision matching torch) and its own copies elsewhere. Here:

* both paths give the values of the hand-written formulas the project used before (copied below as
  ``_old_*``, from ``sharp/backbones/video.py`` before qwen-vl-utils was used) and stored numbers,
  over many sizes, frame rates and frame counts;
* where qwen-vl-utils imports: the functions route through it, its constants are the project's, and
  ``qwen_vl_utils.fetch_video`` on a real mp4, followed by lmms-eval's choice of 32 of its frames,
  gives exactly the frames (pixels) and size of ``qwen2vl_sample_frames``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharp.backbones import video as V

FACTOR = 28


def _qvu_or_skip():
    module = V.qwen_vl_utils_module()
    if module is None:
        pytest.skip("qwen_vl_utils does not import here (not installed, or no torchvision matching this torch; "
                    "scripts/setup.sh's default torch line has one)")
    return module


@pytest.fixture(params=["qwen_vl_utils", "copy"])
def path(request, monkeypatch):
    """Run a test through qwen-vl-utils' functions, then through the module's own copies."""
    if request.param == "qwen_vl_utils":
        _qvu_or_skip()
    else:
        monkeypatch.setattr(V, "qwen_vl_utils_module", lambda: None)
    return request.param


# -- the formulas as they were written in sharp/backbones/video.py before qwen-vl-utils was used -------


def _old_smart_resize(height, width, factor, min_pixels, max_pixels):
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def _old_nframes(total, video_fps, fps=2.0, min_frames=4, max_frames=768):
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = min(min(max(total / video_fps * fps, lo), hi), total)
    return int(math.floor(n / 2) * 2)


def _old_indices(total, video_fps, max_num_frames=32):
    n = _old_nframes(total, video_fps)
    decoded = torch.linspace(0, total - 1, n).round().long().numpy()
    return decoded[np.unique(np.linspace(0, n - 1, max_num_frames, dtype=int))]


SIZES = [(48, 64), (84, 84), (96, 96), (168, 168), (240, 320), (360, 640), (480, 640), (720, 1280),
         (1080, 1920), (2160, 3840), (1920, 1080), (10, 1000), (1000, 10), (30, 2000), (27, 29)]
PIXEL_LIMITS = [(3136, 602112), (3136, 235200.0), (100352, 602112), (200704, 1605632), (3136, 12544), (784, 4000)]
FRAME_COUNTS = [2, 3, 4, 5, 7, 16, 31, 32, 33, 40, 64, 100, 160, 301, 1000, 5000, 30 * 3600]
FPS = [1.0, 2.0, 4.0, 8.0, 10.0, 23.976, 25.0, 29.97, 30.0, 60.0]


def test_sizes_equal_the_old_formula(path):
    for h, w in SIZES:
        for lo, hi in PIXEL_LIMITS:
            for factor in (28, 32):  # Qwen2/2.5-VL (14 x 2), Qwen3-VL (16 x 2)
                got = V.qwen2vl_smart_resize(h, w, factor, lo, hi, flavor="qwen_vl_utils")
                assert got == _old_smart_resize(h, w, factor, lo, hi), (path, h, w, factor, lo, hi)
                assert all(isinstance(v, int) for v in got)


def test_stored_sizes(path):
    # (h, w, min_pixels, max_pixels) -> (h', w'): computed with the old formula, kept as numbers
    stored = {(480, 640, 3136, 602112): (476, 644), (96, 96, 3136, 602112): (84, 84),
              (168, 168, 3136, 602112): (168, 168), (1080, 1920, 3136, 602112): (560, 1008),
              (1080, 1920, 3136, 235200.0): (336, 644), (720, 1280, 3136, 602112): (560, 1008),
              (48, 64, 3136, 602112): (56, 56), (10, 1000, 784, 4000): (0, 616)}
    for (h, w, lo, hi), size in stored.items():
        assert V.qwen2vl_smart_resize(h, w, FACTOR, lo, hi, flavor="qwen_vl_utils") == size, (path, h, w)


def test_frame_counts_and_indices_equal_the_old_formula(path):
    for total in FRAME_COUNTS:
        for fps in FPS:
            assert V.qwen2vl_nframes(total, fps) == _old_nframes(total, fps), (path, total, fps)
            if total <= 5000:
                np.testing.assert_array_equal(V.qwen2vl_frame_indices(total, fps), _old_indices(total, fps))
    # stored: (total, video fps) -> decoded frames
    stored = {(40, 8.0): 10, (160, 8.0): 40, (55, 10.0): 10, (30, 30.0): 4, (3, 8.0): 2, (32, 2.0): 32,
              (64, 2.0): 64, (30 * 3600, 30.0): 768, (301, 29.97): 20}
    for (total, fps), n in stored.items():
        assert V.qwen2vl_nframes(total, fps) == n, (path, total, fps)
    np.testing.assert_array_equal(V.qwen2vl_frame_indices(40, 8.0), [0, 4, 9, 13, 17, 22, 26, 30, 35, 39])
    with pytest.raises(V.VideoError, match="has 1 frames"):
        V.qwen2vl_nframes(1, 8.0)


def test_the_library_is_what_runs():
    module = _qvu_or_skip()
    assert (V.QWEN_FPS, V.QWEN_FRAME_FACTOR, V.QWEN_FPS_MIN_FRAMES, V.QWEN_FPS_MAX_FRAMES) == (
        module.FPS, module.FRAME_FACTOR, module.FPS_MIN_FRAMES, module.FPS_MAX_FRAMES)
    assert (V.QWEN_VIDEO_MIN_TOKEN_NUM, V.QWEN_VIDEO_MAX_TOKEN_NUM, V.QWEN_MAX_RATIO, V.QWEN_MODEL_SEQ_LEN) == (
        module.VIDEO_MIN_TOKEN_NUM, module.VIDEO_MAX_TOKEN_NUM, module.MAX_RATIO, module.MODEL_SEQ_LEN)
    calls = []
    real_resize, real_nframes = module.smart_resize, module.smart_nframes
    try:
        module.smart_resize = lambda *a, **k: calls.append("smart_resize") or real_resize(*a, **k)
        module.smart_nframes = lambda *a, **k: calls.append("smart_nframes") or real_nframes(*a, **k)
        V.qwen2vl_smart_resize(480, 640, FACTOR, 3136, 602112, flavor="qwen_vl_utils")
        V.qwen2vl_nframes(40, 8.0)
        V.qwen2vl_smart_resize(480, 640, FACTOR, 3136, 602112)  # the transformers flavour is not qwen-vl-utils'
    finally:
        module.smart_resize, module.smart_nframes = real_resize, real_nframes
    assert calls == ["smart_resize", "smart_nframes"]


def _lmms_eval_qwen_frames(module, path, max_pixels, min_pixels=3136, max_num_frames=32):
    """What lmms-eval 0.7.3's ``qwen2_vl`` wrapper feeds the processor (l. 268-283, 349-381):
    ``fetch_video`` of its video message, then 32 evenly spaced of the decoded frames, as uint8."""
    video = module.fetch_video({"type": "video", "video": str(path), "max_pixels": max_pixels,
                                "min_pixels": min_pixels})  # (n, 3, H', W') float of rounded values
    keep = np.unique(np.linspace(0, video.shape[0] - 1, max_num_frames, dtype=int))
    return video[keep].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("t,h,w,fps,max_pixels", [
    (40, 48, 64, 8, 602112),     # 10 frames decoded, all kept; upscaled to 56x56
    (100, 96, 96, 4, 602112),    # 50 decoded, 32 kept; 84x84
    (32, 168, 168, 2, 602112),   # the scenes benchmark's videos: every frame, no resize
    (24, 120, 200, 3, 3136 * 4), # downscaled under a small pixel budget
])
def test_fetch_video_frames_equal_ours(tmp_path, t, h, w, fps, max_pixels):
    module = _qvu_or_skip()
    rng = np.random.default_rng(t + h)
    frames = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(frames[:, ::8, ::8], 8, axis=1), 8, axis=2)[:, :h, :w]  # blocky: survives x264
    path = V.write_video(tmp_path / "v.mp4", np.ascontiguousarray(frames), fps=fps)
    ours = V.qwen2vl_sample_frames(path, max_pixels=max_pixels)
    theirs = _lmms_eval_qwen_frames(module, path, max_pixels)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
