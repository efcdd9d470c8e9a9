"""Tests for sharp.backbones.video: mp4 round trip, lmms-eval frame sampling, and preprocessing parity
with the transformers (slow, torchvision-free) image processors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sharp.backbones.video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoError,
    load_frames_uniform,
    qwen2vl_frame_indices,
    qwen2vl_nframes,
    qwen2vl_preprocess,
    qwen2vl_sample_frames,
    qwen2vl_smart_resize,
    qwen2vl_video_pixel_limits,
    siglip_preprocess,
    uniform_frame_indices,
    write_video,
)

import compat_helpers

H, W = 48, 64  # decord 0.6.0 mis-decodes a few tiny sizes (e.g. 32x48); 48x64 is safe.

# 125 well-separated colours; each test frame is one of them, so decoded frames are identified by
# their nearest palette colour despite H.264 / yuv420p error.
PALETTE = np.array(list(itertools.product([0, 64, 128, 192, 255], repeat=3)), dtype=np.uint8)


def _colour_video(num_frames: int, seed: int = 0, h: int = H, w: int = W):
    """(T, h, w, 3) solid-colour frames, all colours distinct, and their palette ids (T,)."""
    ids = np.random.RandomState(seed).choice(len(PALETTE), size=num_frames, replace=False)
    frames = np.broadcast_to(PALETTE[ids][:, None, None, :], (num_frames, h, w, 3)).copy()
    return frames, ids


def _palette_ids(frames: np.ndarray) -> np.ndarray:
    """Nearest palette colour id of each frame's mean colour. (T, H, W, 3) -> (T,)."""
    means = frames.reshape(frames.shape[0], -1, 3).mean(axis=1)  # (T, 3)
    d = ((means[:, None, :] - PALETTE[None].astype(np.float64)) ** 2).sum(-1)  # (T, 125)
    return d.argmin(axis=1)


@pytest.fixture(scope="module")
def video40(tmp_path_factory):
    """40 frames at 8 fps (5 s), 48x64, every frame a distinct solid colour."""
    frames, ids = _colour_video(40)
    path = tmp_path_factory.mktemp("vid") / "v40.mp4"
    assert write_video(path, frames, fps=8) == path
    return path, frames, ids


# ----------------------------------------------------------------------------- writing / reading


def test_roundtrip_uniform_sampling_preserves_order(video40):
    path, _, ids = video40
    out = load_frames_uniform(path, num_frames=8)
    assert out.shape == (8, H, W, 3) and out.dtype == np.uint8
    idx = np.linspace(0, 39, 8, dtype=int)  # lmms-eval llava_onevision.load_video
    np.testing.assert_array_equal(idx, uniform_frame_indices(40, 8))
    np.testing.assert_array_equal(_palette_ids(out), ids[idx])
    # solid colours survive the codec closely
    assert np.abs(out.astype(int) - PALETTE[ids[idx]][:, None, None, :].astype(int)).max() <= 12


def test_all_frames_and_array_input(video40):
    path, frames, ids = video40
    out = load_frames_uniform(path, num_frames=40)
    np.testing.assert_array_equal(_palette_ids(out), ids)
    arr = load_frames_uniform(frames, num_frames=7)
    np.testing.assert_array_equal(arr, frames[np.linspace(0, 39, 7, dtype=int)])


def test_fewer_frames_than_asked(tmp_path):
    frames, ids = _colour_video(5, seed=1)
    path = write_video(tmp_path / "short.mp4", frames, fps=8)
    with pytest.raises(VideoError) as err:
        load_frames_uniform(path, num_frames=8)
    msg = str(err.value)
    assert "short.mp4" in msg and "5 frames" in msg and "8 frames" in msg
    # lmms-eval behaviour: truncated linspace repeats frames
    out = load_frames_uniform(path, num_frames=8, strict=False)
    assert out.shape == (8, H, W, 3)
    np.testing.assert_array_equal(_palette_ids(out), ids[[0, 0, 1, 1, 2, 2, 3, 4]])
    with pytest.raises(VideoError, match="5 frames"):
        load_frames_uniform(frames, num_frames=8)


def test_corrupt_missing_empty(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(VideoError, match="corrupt.mp4"):
        load_frames_uniform(bad, 4)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        qwen2vl_sample_frames(bad)
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="not found.*nope.mp4"):
        load_frames_uniform(missing, 4)
    with pytest.raises(VideoError, match="nope.mp4"):
        qwen2vl_sample_frames(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4"):
        load_frames_uniform(empty, 4)
    assert issubclass(VideoError, ValueError)


def test_write_video_validates(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 47, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 48, 64, 3), np.float32))


# ----------------------------------------------------------------------------- SigLIP (LLaVA-OV)


def _slow_processor(transformers, name: str):
    """The PIL (slow) image processor ``name``: 5.x's default class is the torchvision one where
    torchvision is installed (``<name>Pil`` is the PIL one); 4.57's default is the PIL one."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _random_frames(t, h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,shape", [(384, (2, 50, 70)), (32, (3, 45, 61))])
def test_siglip_matches_transformers(size, shape):
    transformers = pytest.importorskip("transformers")
    frames = _random_frames(*shape)
    ours = siglip_preprocess(frames, image_size=size)
    assert ours.shape == (shape[0], 3, size, size) and ours.dtype == torch.float32

    # 1) slow SiglipImageProcessor (mean = std = 0.5, bicubic) at size x size
    proc = _slow_processor(transformers, "SiglipImageProcessor")(size={"height": size, "width": size})
    ref = proc(images=list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    # 2) the LLaVA-NeXT SigLipImageProcessor transform chain (what lmms-eval runs), rebuilt from
    #    transformers.image_transforms: resize -> rescale -> normalize, channels first.
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    chain = []
    for f in frames:
        x = resize(f, size=(size, size), resample=PILImageResampling.BICUBIC, data_format=first)
        x = rescale(x, scale=1 / 255, data_format=first)
        x = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), data_format=first)
        chain.append(x)
    torch.testing.assert_close(ours, torch.from_numpy(np.stack(chain)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- Qwen2-VL


@pytest.mark.parametrize(
    "t,h,w,kwargs",
    [
        (4, 60, 90, {}),  # 7B defaults, resize 60x90 -> 56x84
        (3, 100, 40, {"min_pixels": 784, "max_pixels": 2352}),  # odd T (padded), max_pixels shrinks
        (2, 20, 30, {"min_pixels": 3136}),  # min_pixels enlarges
        (2, 56, 84, {}),  # already a valid size: no resize
        (5, 37, 53, {"patch_size": 4, "merge_size": 2, "min_pixels": 64, "max_pixels": 4096}),  # tiny backbone
    ],
)
def test_qwen2vl_preprocess_matches_transformers(t, h, w, kwargs):
    transformers = pytest.importorskip("transformers")
    frames = _random_frames(t, h, w, seed=t + h)
    ours, grid = qwen2vl_preprocess(frames, **kwargs)
    proc = _slow_processor(transformers, "Qwen2VLImageProcessor")(
        min_pixels=kwargs.get("min_pixels", 3136),
        max_pixels=kwargs.get("max_pixels", 602112),
        patch_size=kwargs.get("patch_size", 14),
        merge_size=kwargs.get("merge_size", 2),
    )
    ref = compat_helpers.qwen_video_patches(proc, frames)  # 5.x: videos left the image processor
    assert grid.dtype == torch.long and grid.shape == (1, 3)
    torch.testing.assert_close(grid, ref["video_grid_thw"].long(), atol=0, rtol=0)
    assert ours.shape == ref["pixel_values_videos"].shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref["pixel_values_videos"].float(), atol=1e-5, rtol=0)


def test_qwen2vl_default_token_geometry():
    frames = _random_frames(4, 56, 84)  # already a multiple of 28: no resize
    pv, grid = qwen2vl_preprocess(frames)
    assert grid.tolist() == [[2, 4, 6]]  # 56x84 -> 4x6 patches of 14, T 4 -> 2
    assert pv.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    # explicit flattening order: rows go (t, h/2, w/2, 2, 2); each row is (C, t2, 14, 14)
    x = (frames.astype(np.float64) / 255).astype(np.float32)
    x = (x - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)  # (T, H, W, 3)
    x = x.transpose(0, 3, 1, 2)  # (T, 3, H, W)

    def block(t, r, c):  # temporal pair t, patch row r, patch col c -> (3*2*14*14,)
        return x[2 * t : 2 * t + 2, :, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14].transpose(1, 0, 2, 3).reshape(-1)

    expected_rc = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for row, (r, c) in enumerate(expected_rc):
        np.testing.assert_allclose(pv[row].numpy(), block(0, r, c), atol=1e-6)
    np.testing.assert_allclose(pv[24].numpy(), block(1, 0, 0), atol=1e-6)  # second temporal pair


def test_smart_resize_flavours():
    transformers = pytest.importorskip("transformers")
    try:  # 5.x: the torchvision-free image processor's module; 4.57: the only one
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = np.random.RandomState(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.randint(10, 2000, size=2))
        lo, hi = 3136, int(rng.choice([602112, 235200, 12845056, 10000]))
        assert qwen2vl_smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi)
    # qwen-vl-utils differs only by where the >= factor clamp happens (degenerate 10 px side)
    assert qwen2vl_smart_resize(10, 1000, 28, 784, 4000, flavor="qwen_vl_utils") == (0, 616)
    assert qwen2vl_smart_resize(10, 1000, 28, 784, 4000) == (28, 280)
    assert qwen2vl_smart_resize(480, 640, 28, 3136, 602112, flavor="qwen_vl_utils") == (476, 644)


def test_qwen2vl_frame_counts_and_pixel_budget():
    # 5 s at 8 fps -> 2 fps -> 10 frames, all kept by lmms-eval
    assert qwen2vl_nframes(40, 8.0) == 10
    np.testing.assert_array_equal(qwen2vl_frame_indices(40, 8.0), [0, 4, 9, 13, 17, 22, 26, 30, 35, 39])
    # 20 s at 8 fps -> 40 frames decoded, 32 evenly spaced kept
    assert qwen2vl_nframes(160, 8.0) == 40
    idx = qwen2vl_frame_indices(160, 8.0)
    assert len(idx) == 32 and np.all(np.diff(idx) > 0) and idx[0] == 0 and idx[-1] == 159
    # odd rounding: 5.5 s at 2 fps -> 11 -> floored to 10 (FRAME_FACTOR 2); min 4 frames
    assert qwen2vl_nframes(55, 10.0) == 10
    assert qwen2vl_nframes(30, 30.0) == 4
    assert qwen2vl_nframes(3, 8.0) == 2  # capped by the video length, kept even
    with pytest.raises(VideoError, match="1 frames"):
        qwen2vl_nframes(1, 8.0)
    # very long video: 768-frame cap
    assert qwen2vl_nframes(30 * 3600, 30.0) == 768
    # per-frame pixel limits (lmms-eval min/max 3136 / 602112, total budget 128000*28*28*0.9)
    assert qwen2vl_video_pixel_limits(10) == (3136, 602112)
    assert qwen2vl_video_pixel_limits(300) == (3136, 602112)
    assert qwen2vl_video_pixel_limits(768) == (3136, pytest.approx(235200.0))
    assert qwen2vl_video_pixel_limits(10, None, None) == (100352, 602112)


def test_qwen2vl_sample_frames_from_file(video40, tmp_path):
    path, frames, ids = video40
    out = qwen2vl_sample_frames(path)
    expected = qwen2vl_frame_indices(40, 8.0)
    assert out.shape == (10, 56, 56, 3) and out.dtype == np.uint8  # 48x64 -> smart_resize -> 56x56
    np.testing.assert_array_equal(_palette_ids(out), ids[expected])
    native = qwen2vl_sample_frames(path, resize=False)
    assert native.shape == (10, H, W, 3)
    np.testing.assert_array_equal(qwen2vl_sample_frames(frames, video_fps=8.0, resize=False), frames[expected])
    # qwen-vl-utils output is already a valid size: the processor does not resize again
    pv, grid = qwen2vl_preprocess(out)
    assert grid.tolist() == [[5, 4, 4]] and pv.shape == (80, 1176)

    long_frames, long_ids = _colour_video(100, seed=3)
    long_path = write_video(tmp_path / "long.mp4", long_frames, fps=4)  # 25 s -> 50 frames at 2 fps
    out = qwen2vl_sample_frames(long_path, max_num_frames=32)
    expected = qwen2vl_frame_indices(100, 4.0, 32)
    assert out.shape[0] == 32 == len(expected)
    np.testing.assert_array_equal(_palette_ids(out), long_ids[expected])


def test_qwen2vl_resize_is_antialiased_bicubic():
    # a solid frame stays solid; sizes follow qwen-vl-utils smart_resize
    frames = np.full((2, 100, 150, 3), 77, np.uint8)
    out = qwen2vl_sample_frames(frames, video_fps=2.0, max_pixels=3136 * 2)
    assert out.shape[1] % 28 == 0 and out.shape[2] % 28 == 0 and out.shape[1] * out.shape[2] <= 3136 * 2
    assert np.all(out == 77)
    ramp = np.tile(np.linspace(0, 255, 150).astype(np.uint8)[None, None, :, None], (2, 100, 1, 3))
    r = qwen2vl_sample_frames(ramp, video_fps=2.0, max_pixels=3136 * 2)
    x = torch.from_numpy(ramp).permute(0, 3, 1, 2).float()
    ref = torch.nn.functional.interpolate(x, size=r.shape[1:3], mode="bicubic", align_corners=False, antialias=True)
    ref = ref.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(r, ref)
