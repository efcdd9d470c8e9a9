"""Video decoding, frame sampling and vision preprocessing for the two backbones.

Everything here reproduces, without torchvision, what lmms-eval 0.7.3 feeds the models, so that the
pruning methods see the same visual tokens as in the published numbers.

LLaVA-OneVision (``lmms_eval/models/simple/llava_onevision.py``)
    ``LlavaOneVision.load_video`` (l. 404-413) opens the file with ``decord.VideoReader(path,
    ctx=cpu(0))`` and reads ``np.linspace(0, len(vr) - 1, max_frames_num, dtype=int)`` (32 frames
    by default) with ``vr.get_batch``. A video with fewer frames than asked therefore gets
    *repeated* frames (the truncated linspace has duplicates); the LLaVA-OV backbone samples short
    videos that way too, with a warning in the log (``strict=False``). Any exception while loading is only
    logged and the question is answered without the video (l. 510-512); here it is a
    :class:`VideoError` instead. The frames then go through LLaVA-NeXT's ``SigLipImageProcessor``
    (``llava/model/multimodal_encoder/siglip_encoder.py``): per frame, PIL bicubic resize to
    384x384, ``rescale`` by 1/255 and ``normalize`` with mean = std = 0.5, channels first. That is
    :func:`load_frames_uniform` + :func:`siglip_preprocess`.

Qwen2-VL (``lmms_eval/models/simple/qwen2_vl.py`` + ``qwen_vl_utils/vision_process.py`` 0.0.14)
    The wrapper (l. 268-283) passes ``{"type": "video", "video": path, "max_pixels": 602112,
    "min_pixels": 3136}`` to ``qwen_vl_utils.process_vision_info``, whose ``fetch_video``

    1. decodes (decord backend unless torchcodec is installed) ``nframes = smart_nframes(...)``
       frames: ``total / video_fps * 2`` clamped to ``[4, min(768, total)]`` and floored to an even
       number (``FRAME_FACTOR = 2``) at ``torch.linspace(0, total - 1, nframes).round()``;
    2. resizes every frame with ``smart_resize(h, w, factor=28, min_pixels, max_pixels)`` where
       ``min_pixels = 3136`` (from lmms-eval) and ``max_pixels = min(602112, max(min(768 * 28**2,
       total_pixels / nframes * 2), int(1.05 * min_pixels)))`` with ``total_pixels = 128000 * 28**2
       * 0.9`` (``MODEL_SEQ_LEN`` env var, default 128000). So frames keep at most 602112 pixels
       while ``nframes <= 300`` (videos up to 150 s) and fewer beyond: e.g. 235200 pixels at the
       768-frame cap. The resize is torchvision ``resize(BICUBIC, antialias=True)`` on the uint8
       tensor, i.e. ``F.interpolate(bicubic, antialias=True)`` in float32, clamp, round, uint8;
    3. returns the float video; lmms-eval (l. 349-381) then keeps
       ``np.unique(np.linspace(0, nframes - 1, 32, dtype=int))`` of those frames: 32 frames, or all
       ``nframes`` (an even number, >= 2) when fewer.

    Finally ``Qwen2VLProcessor`` (video processor) runs ``smart_resize`` again (identity on those
    frames: they already are multiples of 28 within the pixel limits), rescales, normalizes with
    the OpenAI CLIP mean/std and cuts ``2 x 14 x 14`` patches in merge-2 order. That is
    :func:`qwen2vl_sample_frames` + :func:`qwen2vl_preprocess`.

    The two formulas of step 1 and 2 (``smart_nframes``, ``smart_resize``) are qwen-vl-utils' own
    functions wherever it imports (:func:`qwen_vl_utils_module`); only the 32 kept frames are
    decoded (the same frames: lmms-eval keeps a subset of what qwen-vl-utils decodes). qwen-vl-utils
    imports torchvision, which a CPU-only torch wheel has no match for on PyPI; there the copies
    below compute them (``tests/test_qwen_vl_utils.py`` checks both equal, and the frames and sizes
    of ``qwen_vl_utils.fetch_video`` equal to :func:`qwen2vl_sample_frames`'s).

All frame arrays are ``np.uint8`` RGB of shape ``(T, H, W, 3)``.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]
FramesLike = Union[np.ndarray, torch.Tensor, Sequence]

__all__ = [
    "VideoError",
    "qwen_vl_utils_module",
    "write_video",
    "uniform_frame_indices",
    "load_frames_uniform",
    "siglip_preprocess",
    "qwen2vl_smart_resize",
    "qwen2vl_nframes",
    "qwen2vl_frame_indices",
    "qwen2vl_video_pixel_limits",
    "qwen2vl_sample_frames",
    "qwen2vl_preprocess",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
]

_log = logging.getLogger(__name__)

# SigLIP (LLaVA-OneVision vision tower) normalization.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Same values as transformers.image_utils.OPENAI_CLIP_MEAN / _STD (Qwen2-VL).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-vl-utils 0.0.14 constants (vision_process.py; equal to the module's, tests/test_qwen_vl_utils.py).
QWEN_FPS = 2.0
QWEN_FRAME_FACTOR = 2
QWEN_FPS_MIN_FRAMES = 4
QWEN_FPS_MAX_FRAMES = 768
QWEN_VIDEO_MIN_TOKEN_NUM = 128
QWEN_VIDEO_MAX_TOKEN_NUM = 768
QWEN_MAX_RATIO = 200
QWEN_MODEL_SEQ_LEN = int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))
# lmms-eval 0.7.3 `qwen2_vl` wrapper defaults.
QWEN2VL_MIN_PIXELS = 3136
QWEN2VL_MAX_PIXELS = 602112


class VideoError(ValueError):
    """A video that cannot be used: missing, corrupt, undecodable or too short.

    The message always names the file (or ``<array>`` for in-memory frames) and the problem.
    """


@functools.lru_cache(maxsize=1)
def qwen_vl_utils_module():
    """``qwen_vl_utils.vision_process`` (qwen-vl-utils 0.0.14, what lmms-eval's Qwen wrappers call via
    ``process_vision_info``), or ``None`` where it does not import.

    It imports torchvision at module level. The PyPI torch builds have a matching torchvision
    (``scripts/setup.sh``'s default line installs torch 2.15.0 with torchvision 0.29.2); a CPU-only
    torch wheel (``2.13.0+cpu``) has none on PyPI (the PyPI torchvision fails there with ``operator
    torchvision::nms does not exist``), so qwen-vl-utils cannot import and this module's copies of
    its formulas are used instead.
    """
    try:
        from qwen_vl_utils import vision_process
    except Exception:  # noqa: BLE001 - ImportError (absent, no torchvision), RuntimeError (mismatched torchvision)
        return None
    return vision_process


# --------------------------------------------------------------------------------------------
# Writing (tests, synthetic benchmark)
# --------------------------------------------------------------------------------------------


def write_video(path: PathLike, frames: np.ndarray, fps: float = 8, crf: int = 18) -> PathLike:
    """Encode ``frames`` as an H.264 (libx264, yuv420p) mp4 with PyAV and return ``path``.

    Args:
        path: output file (``.mp4``); overwritten if it exists.
        frames: ``(T, H, W, 3)`` uint8 RGB, ``T >= 1``; ``H`` and ``W`` must be even (yuv420p
            subsamples chroma by 2; we refuse rather than silently crop or pad).
        fps: frame rate written in the container (decord's ``get_avg_fps`` reads it back).
        crf: x264 constant-rate factor (lower = closer to the input; 18 is visually lossless).
    """
    import av  # local import: only needed to write

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_video({path}): frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video({path}): frames must be uint8, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video({path}): H and W must be even for yuv420p, got H={h}, W={w}")
    rate = Fraction(str(fps)).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


# --------------------------------------------------------------------------------------------
# Decoding helpers
# --------------------------------------------------------------------------------------------


def _open_decord(path: PathLike):
    """``decord.VideoReader(path, ctx=cpu(0))`` with every failure turned into a VideoError."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video file not found: {path}")
    if not p.is_file():
        raise VideoError(f"video path is not a file: {path}")
    if p.stat().st_size == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    try:
        import decord
    except ImportError as err:  # pragma: no cover - decord is a hard dependency
        raise VideoError(f"cannot decode {path}: decord is not installed ({err})") from err
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as err:  # decord raises RuntimeError / DECORDError
        raise VideoError(f"cannot open video {path} (corrupt or unsupported): {type(err).__name__}: {err}") from err
    try:
        n = len(vr)
    except Exception as err:
        raise VideoError(f"cannot read the frame count of video {path}: {type(err).__name__}: {err}") from err
    if n <= 0:
        raise VideoError(f"video {path} has no decodable frames")
    return vr


def _decord_get_batch(vr, indices: Sequence[int], path: PathLike) -> np.ndarray:
    """``vr.get_batch(indices).asnumpy()`` -> ``(len(indices), H, W, 3)`` uint8, or VideoError."""
    indices = [int(i) for i in indices]
    try:
        frames = vr.get_batch(indices).asnumpy()
    except Exception as err:
        raise VideoError(
            f"cannot decode frames {indices[:4]}{'...' if len(indices) > 4 else ''} of video {path}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(
            f"video {path} decoded to an unexpected array {frames.shape} {frames.dtype}; expected "
            f"({len(indices)}, H, W, 3) uint8"
        )
    return frames


def _as_frames(frames: FramesLike, what: str = "frames") -> np.ndarray:
    """Any frames container -> ``(T, H, W, 3)`` uint8 numpy array (no copy when possible).

    Accepts a ``(T, H, W, 3)`` / ``(H, W, 3)`` uint8 numpy array or torch tensor, or a sequence of
    ``(H, W, 3)`` uint8 arrays / PIL images of one size.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        frames = list(frames)
        if not frames:
            raise ValueError(f"{what}: empty frame list")
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{what}: expected (T, H, W, 3) RGB frames, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 frames in [0, 255], got dtype {frames.dtype}")
    return frames


# --------------------------------------------------------------------------------------------
# LLaVA-OneVision: uniform sampling + SigLIP preprocessing
# --------------------------------------------------------------------------------------------


def uniform_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """``np.linspace(0, total_frames - 1, num_frames, dtype=int)``: lmms-eval's LLaVA-OV sampling.

    Returns ``(num_frames,)`` int64, non-decreasing; it repeats indices when
    ``total_frames < num_frames`` (the cast to int truncates).
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int)


def load_frames_uniform(video: Union[PathLike, np.ndarray], num_frames: int = 32, *, strict: bool = True) -> np.ndarray:
    """Sample ``num_frames`` frames uniformly, exactly as lmms-eval's ``llava_onevision`` does.

    Args:
        video: a video file (decoded with decord, ``ctx=cpu(0)``) or already-decoded frames
            ``(T, H, W, 3)`` uint8 (then the same indices are taken from the array).
        num_frames: frames to return (lmms-eval ``max_frames_num``, default 32).
        strict: if the video has fewer than ``num_frames`` frames, raise :class:`VideoError`
            (default). With ``strict=False`` do what lmms-eval does: the truncated linspace repeats
            frames, so exactly ``num_frames`` frames come back with duplicates (and a warning is logged).

    Returns:
        ``(num_frames, H, W, 3)`` uint8 RGB, in temporal order.

    Raises:
        VideoError: missing / empty / corrupt / undecodable file, or too few frames with ``strict``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(video, (np.ndarray, torch.Tensor)):
        array = _as_frames(video, "load_frames_uniform")
        total, name = array.shape[0], "<array>"
    else:
        vr = _open_decord(video)
        total, name = len(vr), str(video)
    if total < num_frames:
        if strict:
            raise VideoError(f"video {name} has {total} frames but {num_frames} frames were asked")
        _log.warning("short video %s: %d frames, %d asked; sampling %d indices with repeats "
                     "(lmms-eval's llava_onevision reader)", name, total, num_frames, num_frames)
    idx = uniform_frame_indices(total, num_frames)  # (num_frames,)
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return array[idx]
    return _decord_get_batch(vr, idx.tolist(), video)  # (num_frames, H, W, 3)


def _size_hw(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def siglip_preprocess(
    frames: FramesLike,
    image_size: Union[int, Sequence[int]] = 384,
    image_mean: Sequence[float] = SIGLIP_MEAN,
    image_std: Sequence[float] = SIGLIP_STD,
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """LLaVA-OneVision video-frame preprocessing (LLaVA-NeXT ``SigLipImageProcessor``).

    Per frame: PIL bicubic resize of the uint8 frame to ``image_size`` (no aspect preservation, no
    crop), ``x.astype(float64) * rescale_factor`` cast to float32, then ``(x - mean) / std`` in
    float32 -- bit-identical to ``transformers`` ``resize`` / ``rescale`` / ``normalize`` used by
    that processor and by the slow ``SiglipImageProcessor(size=384x384)``.

    Args:
        frames: ``(T, H, W, 3)`` uint8 (or a list of ``(H, W, 3)`` frames / PIL images).
        image_size: output side (int) or ``(height, width)``; 384 for SigLIP-so400m-384.

    Returns:
        ``(T, 3, S, S)`` float32 tensor (lmms-eval casts it to fp16 afterwards).
    """
    from PIL import Image

    frames = _as_frames(frames, "siglip_preprocess")
    out_h, out_w = _size_hw(image_size)
    # (T, S, S, 3) uint8: PIL resize per frame (PIL takes (width, height)).
    resized = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((out_w, out_h), resample=Image.BICUBIC)) for f in frames]
    )
    return _rescale_normalize_chw(resized, rescale_factor, image_mean, image_std)


def _rescale_normalize_chw(
    frames: np.ndarray, rescale_factor: float, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, H, W)`` float32, the transformers rescale/normalize way."""
    x = (frames.astype(np.float64) * rescale_factor).astype(np.float32)  # (T, H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (T, 3, H, W)


# --------------------------------------------------------------------------------------------
# Qwen2-VL: qwen-vl-utils frame selection + pixel budget, then Qwen2VL image/video processor
# --------------------------------------------------------------------------------------------


def qwen2vl_smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: float = QWEN2VL_MIN_PIXELS,
    max_pixels: float = QWEN2VL_MAX_PIXELS,
    *,
    flavor: str = "transformers",
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``.

    ``flavor="transformers"`` is ``transformers.models.qwen2_vl.image_processing_qwen2_vl.
    smart_resize``; ``flavor="qwen_vl_utils"`` is ``qwen_vl_utils.vision_process.smart_resize``
    (called where it imports, :func:`qwen_vl_utils_module`; else the copy below). They differ only
    in where the ``>= factor`` floor is applied: on the rounded size (qwen-vl-utils) or on the
    shrunk size (transformers).
    """
    if flavor not in ("transformers", "qwen_vl_utils"):
        raise ValueError(f"flavor must be 'transformers' or 'qwen_vl_utils', got {flavor!r}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {QWEN_MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    qvu = flavor == "qwen_vl_utils"
    module = qwen_vl_utils_module() if qvu else None
    if module is not None:
        h_bar, w_bar = module.smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return int(h_bar), int(w_bar)
    h_bar = round(height / factor) * factor  # Python round: half to even, as both sources
    w_bar = round(width / factor) * factor
    if qvu:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if not qvu:
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def qwen2vl_nframes(
    total_frames: int,
    video_fps: float,
    fps: float = QWEN_FPS,
    min_frames: int = QWEN_FPS_MIN_FRAMES,
    max_frames: int = QWEN_FPS_MAX_FRAMES,
    name: str = "<video>",
) -> int:
    """qwen-vl-utils ``smart_nframes`` (``fps`` mode): how many frames it decodes (its function where
    it imports, :func:`qwen_vl_utils_module`; else the copy below).

    ``total / video_fps * fps`` clamped to ``[ceil2(min_frames), floor2(min(max_frames, total))]``
    and to ``total``, then floored to a multiple of ``FRAME_FACTOR = 2``.

    Raises:
        VideoError: fewer than 2 frames would be kept (e.g. a 1-frame video).
    """
    module = qwen_vl_utils_module()
    if module is not None:
        ele = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
        try:
            return int(module.smart_nframes(ele, total_frames=total_frames, video_fps=video_fps))
        except ValueError as err:
            raise VideoError(f"video {name} has {total_frames} frames: qwen-vl-utils: {err}") from err
    f = QWEN_FRAME_FACTOR
    lo = math.ceil(min_frames / f) * f
    hi = math.floor(min(max_frames, total_frames) / f) * f
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = math.floor(n / f) * f
    if not (f <= n <= total_frames):
        raise VideoError(
            f"video {name} has {total_frames} frames: qwen-vl-utils needs between {f} and {total_frames} "
            f"frames but computed {n}"
        )
    return int(n)


def qwen2vl_frame_indices(
    total_frames: int,
    video_fps: float,
    max_num_frames: int = 32,
    fps: float = QWEN_FPS,
    min_frames: int = QWEN_FPS_MIN_FRAMES,
    max_frames: int = QWEN_FPS_MAX_FRAMES,
    name: str = "<video>",
) -> np.ndarray:
    """Indices into the original video of the frames Qwen2-VL sees under lmms-eval.

    qwen-vl-utils reads ``torch.linspace(0, total - 1, nframes).round()`` (float32 linspace,
    half-to-even rounding; inline in its ``_read_video_decord``, no function to call); lmms-eval
    keeps ``np.unique(np.linspace(0, nframes - 1, max_num_frames, dtype=int))`` of those.

    Returns:
        ``(K,)`` int64 increasing, ``K = min(max_num_frames, nframes)`` (always even when
        ``max_num_frames`` is: ``nframes`` is even).
    """
    n = qwen2vl_nframes(total_frames, video_fps, fps, min_frames, max_frames, name)
    decoded = torch.linspace(0, total_frames - 1, n).round().long().numpy()  # (n,)
    keep = np.unique(np.linspace(0, n - 1, max_num_frames, dtype=int, endpoint=True))  # (K,)
    return decoded[keep]


def qwen2vl_video_pixel_limits(
    nframes: int,
    min_pixels: Optional[float] = QWEN2VL_MIN_PIXELS,
    max_pixels: Optional[float] = QWEN2VL_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    total_pixels: Optional[float] = None,
) -> tuple[float, float]:
    """Per-frame ``(min_pixels, max_pixels)`` that qwen-vl-utils ``fetch_video`` resizes with.

    ``nframes`` is the number of frames qwen-vl-utils decoded (before lmms-eval keeps 32).
    ``None`` for ``min_pixels`` / ``max_pixels`` means "not given in the message" (then
    ``128 * factor**2`` and no extra cap). ``total_pixels`` defaults to
    ``MODEL_SEQ_LEN * factor**2 * 0.9``.
    """
    factor = patch_size * merge_size
    if min_pixels is None:
        min_pixels = QWEN_VIDEO_MIN_TOKEN_NUM * factor * factor
    if total_pixels is None:
        total_pixels = QWEN_MODEL_SEQ_LEN * factor * factor * 0.9
    cap = max(
        min(QWEN_VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * QWEN_FRAME_FACTOR),
        int(min_pixels * 1.05),
    )
    return min_pixels, (cap if max_pixels is None else min(max_pixels, cap))


def _resize_bicubic_aa_uint8(frames: np.ndarray, size: tuple[int, int], chunk: int = 8) -> np.ndarray:
    """torchvision ``resize(uint8 tensor, BICUBIC, antialias=True)`` without torchvision.

    ``(T, H, W, 3)`` uint8 -> ``(T, h, w, 3)`` uint8: float32 ``F.interpolate(bicubic,
    align_corners=False, antialias=True)``, clamp to [0, 255], round half to even, cast. Returns
    the input unchanged when the size already matches (torchvision does the same).
    """
    out_h, out_w = size
    if frames.shape[1:3] == (out_h, out_w):
        return frames
    out = np.empty((frames.shape[0], out_h, out_w, 3), dtype=np.uint8)
    for s in range(0, frames.shape[0], chunk):  # bounded memory for long / large videos
        x = torch.from_numpy(frames[s : s + chunk]).permute(0, 3, 1, 2).to(torch.float32)  # (t, 3, H, W)
        y = torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
        out[s : s + chunk] = y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def qwen2vl_sample_frames(
    video: Union[PathLike, np.ndarray],
    max_num_frames: int = 32,
    fps: float = QWEN_FPS,
    *,
    min_pixels: Optional[float] = QWEN2VL_MIN_PIXELS,
    max_pixels: Optional[float] = QWEN2VL_MAX_PIXELS,
    min_frames: int = QWEN_FPS_MIN_FRAMES,
    max_frames: int = QWEN_FPS_MAX_FRAMES,
    total_pixels: Optional[float] = None,
    patch_size: int = 14,
    merge_size: int = 2,
    resize: bool = True,
    video_fps: Optional[float] = None,
) -> np.ndarray:
    """Frames Qwen2-VL receives under lmms-eval 0.7.3 + qwen-vl-utils (see the module docstring).

    Args:
        video: file (decord) or decoded ``(T, H, W, 3)`` uint8 frames (then ``video_fps`` is
            required: the frame rate of those frames).
        max_num_frames: lmms-eval ``max_num_frames`` (32).
        fps: qwen-vl-utils sampling rate (2.0).
        min_pixels, max_pixels: the per-frame limits lmms-eval passes in the message
            (3136 / 602112); further capped by the total-pixel budget, see
            :func:`qwen2vl_video_pixel_limits`.
        resize: apply qwen-vl-utils' resize (``smart_resize`` factor ``patch_size * merge_size``,
            antialiased bicubic). ``False`` returns the frames at their native size.

    Returns:
        ``(K, H', W', 3)`` uint8 with ``K = min(max_num_frames, nframes)`` (even), ``H'``/``W'``
        multiples of ``patch_size * merge_size`` when ``resize``. Fewer than ``max_num_frames``
        frames is *not* an error (short videos are used as they are, as in lmms-eval).

    Raises:
        VideoError: missing / corrupt / undecodable file, or fewer than 2 frames.
    """
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video_fps is None:
            raise ValueError("qwen2vl_sample_frames: video_fps is required for an array of frames")
        array = _as_frames(video, "qwen2vl_sample_frames")
        total, name = array.shape[0], "<array>"
    else:
        vr = _open_decord(video)
        total, name = len(vr), str(video)
        try:
            video_fps = float(vr.get_avg_fps())
        except Exception as err:
            raise VideoError(f"cannot read the frame rate of video {name}: {type(err).__name__}: {err}") from err
    if not video_fps or not math.isfinite(video_fps) or video_fps <= 0:
        raise VideoError(f"video {name} has an invalid frame rate {video_fps}")
    nframes = qwen2vl_nframes(total, video_fps, fps, min_frames, max_frames, name)
    idx = qwen2vl_frame_indices(total, video_fps, max_num_frames, fps, min_frames, max_frames, name)  # (K,)
    if total < max_num_frames:
        _log.warning("short video %s: %d frames, %d asked; qwen-vl-utils' rules keep %d", name, total,
                     max_num_frames, len(idx))
    if isinstance(video, (np.ndarray, torch.Tensor)):
        frames = array[idx]
    else:
        frames = _decord_get_batch(vr, idx.tolist(), video)  # (K, H, W, 3)
    if not resize:
        return frames
    lo, hi = qwen2vl_video_pixel_limits(nframes, min_pixels, max_pixels, patch_size, merge_size, total_pixels)
    h, w = frames.shape[1:3]
    size = qwen2vl_smart_resize(h, w, patch_size * merge_size, lo, hi, flavor="qwen_vl_utils")
    return _resize_bicubic_aa_uint8(frames, size)


def qwen2vl_preprocess(
    frames: FramesLike,
    min_pixels: float = QWEN2VL_MIN_PIXELS,
    max_pixels: float = QWEN2VL_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL video preprocessing (``Qwen2VLImageProcessor._preprocess`` for a video).

    1. ``smart_resize`` (transformers flavour, factor ``patch_size * merge_size``) of the first
       frame's size; PIL bicubic resize of every frame if the size changes;
    2. rescale (float64 * 1/255 -> float32) and normalize with ``image_mean`` / ``image_std``;
    3. pad the time axis to a multiple of ``temporal_patch_size`` by repeating the last frame;
    4. cut ``(C, temporal_patch_size, patch_size, patch_size)`` patches ordered
       ``(t, h // merge, w // merge, merge_h, merge_w)`` -- the merge-2 blocks are contiguous, as
       the vision tower's patch merger expects.

    Args:
        frames: ``(T, H, W, 3)`` uint8, all frames of one size.

    Returns:
        pixel_values_videos: ``(grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2)``
            float32 (``(N, 1176)`` for the 7B).
        video_grid_thw: ``(1, 3)`` int64 ``[[grid_t, grid_h, grid_w]]`` with ``grid_h = H' //
            patch_size`` etc.
    """
    from PIL import Image

    frames = _as_frames(frames, "qwen2vl_preprocess")
    t, h, w, _ = frames.shape
    rh, rw = qwen2vl_smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels, flavor="transformers")
    if (rh, rw) != (h, w):
        frames = np.stack(
            [np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((rw, rh), resample=Image.BICUBIC)) for f in frames]
        )  # (T, rh, rw, 3)
    x = _rescale_normalize_chw(frames, rescale_factor, image_mean, image_std).numpy()  # (T, C, rh, rw)
    if t % temporal_patch_size:
        pad = np.repeat(x[-1:], temporal_patch_size - t % temporal_patch_size, axis=0)
        x = np.concatenate([x, pad], axis=0)  # (T_pad, C, rh, rw)
    c = x.shape[1]
    gt, gh, gw = x.shape[0] // temporal_patch_size, rh // patch_size, rw // patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m_h, m_w, C, tps, p_h, p_w)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return torch.from_numpy(flat), torch.tensor([[gt, gh, gw]], dtype=torch.long)
