"""Deterministic synthetic video multiple-choice benchmark.

Every question's answer depends on *when* something happens in the video, so a
token-pruning method that throws away the tokens of the wrong frames answers it
wrongly.  Videos are tiny (96x96, 32 or 64 frames) real H.264 mp4 files written
once into a cache directory and reused afterwards.

Question types (``qtype``), cycled by document index:

``temporal``   in which quarter of the video does a named object ("the red circle")
               appear; a distractor of another colour and shape appears in another quarter;
``attribute``  one object appears once, at a random time: what colour is it;
``order``      two objects of different colours, one after the other: which colour
               appears first (or last);
``count``      how many separate times (1-4) an object appears;
``long``       64 near-duplicate frames (static texture + slight noise) with a single
               short event; asks when it happens or what colour it is.

Options are listed in a fixed order per question type (the four quarters in time order,
the colours red/green/blue/yellow, the counts 1-4), so the answer letter follows from the
video's content; option texts are short.  Objects also differ in shape, which questions name
but never ask about (a toy model sees each frame as 2x2 or 3x3 tokens, too coarse for shape).

Every event lasts long enough that ``np.linspace(0, T - 1, 32, dtype=int)`` (the
LLaVA-OneVision frame sampler of lmms-eval) hits at least two of its frames; the
videos are written at 2 fps so that a 2 fps sampler (qwen-vl-utils) sees every frame.

Determinism: document ``i`` of split ``s`` with seed ``k`` is generated from
``np.random.default_rng([k, SPLIT_CODE[s], i])`` only, so a split of ``n`` docs is
a prefix of a larger one and splits never share a random stream.  The answer letter
of document ``i`` is fixed by its index so that each letter is used once in every
block of docs ``4k..4k+3`` and, per question type, once in every ``20k..20k+19``.

Cache layout: ``<cache>/v<FORMAT_VERSION>/<split>_seed<seed>_n<n>/`` holds
``videos/<id>.mp4`` and ``manifest.json`` (docs with video paths relative to that
folder), the manifest being written atomically after every video; ``<cache>`` is
``$SHARP_CACHE/synthetic`` or ``~/.cache/sharp/synthetic``.  The mp4 bytes are
reproducible (explicit BT.601 colour conversion, one x264 thread, mbtree off).

Public API: :func:`ensure_split` (generate on first use, then load),
:func:`generate_docs` (metadata only, no files), :func:`render_video`,
:func:`format_prompt`, :func:`sampled_frame_indices`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = [
    "ANSWER_INSTRUCTION",
    "COLORS",
    "DEFAULT_N",
    "FORMAT_VERSION",
    "QTYPES",
    "SHAPES",
    "SPLITS",
    "default_cache_dir",
    "ensure_split",
    "format_prompt",
    "generate_docs",
    "render_video",
    "sampled_frame_indices",
    "split_dir",
    "clear_cache",
]

# Bump when the generator or the files change: old caches are then ignored.
FORMAT_VERSION = 2

LETTERS = "ABCD"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

QTYPES = ("temporal", "attribute", "order", "count", "long")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (35, 75, 235),
    "yellow": (240, 215, 25),
}
SHAPES = ("square", "circle", "triangle", "cross")

QUARTER_OPTIONS = ("first quarter", "second quarter", "third quarter", "last quarter")
COUNT_OPTIONS = ("1", "2", "3", "4")

# split name -> code mixed into the seed.  "default" is a prefix of "test".
SPLIT_CODE = {"train": 1, "test": 2}
SPLITS = ("train", "test", "default")
DEFAULT_N = {"train": 500, "test": 200, "default": 20}

HEIGHT = WIDTH = 96
NUM_FRAMES = 32
LONG_NUM_FRAMES = 64
FPS = 2
SAMPLED_FRAMES = 32  # frames a video LLM samples uniformly (lmms-eval LLaVA-OV style)
MIN_SAMPLED_PER_EVENT = 2

_MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``synthetic/`` of the project's cache root (:func:`sharp.paths.cache_root`: ``$SHARP_CACHE``,
    else ``~/.cache/sharp``)."""
    from sharp.paths import cache_dir

    return cache_dir("synthetic")


def split_dir(split: str, n: int, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base.resolve() / f"v{FORMAT_VERSION}" / f"{split}_seed{seed}_n{n}"


def sampled_frame_indices(total: int, num: int = SAMPLED_FRAMES) -> np.ndarray:
    """The frames that uniform sampling keeps: ``np.linspace(0, total-1, num, dtype=int)``."""
    return np.linspace(0, total - 1, num, dtype=int)


# ----------------------------------------------------------------------------- prompts


def format_prompt(question: str, options: Iterable[str], pre_prompt: str = "", post_prompt: str = ANSWER_INSTRUCTION) -> str:
    """``pre_prompt + question``, then ``A. ...`` option lines, then ``post_prompt``."""
    lines = [f"{pre_prompt}{question}"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    if post_prompt:
        lines.append(post_prompt)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- doc generation


def _answer_index(seed: int, code: int, i: int) -> int:
    """Letter index of doc ``i``: balanced over docs 4k..4k+3 overall and, per qtype, over docs 20k..20k+19."""
    block = i // 20
    perm = np.random.default_rng([seed, code, 10**9 + block]).permutation(4)
    return int(perm[(i // 5 + i % 5) % 4])


def _event(color: str, shape: str, start: int, length: int, role: str, rng: np.random.Generator) -> dict:
    size = int(rng.integers(26, 35))  # full side length in pixels
    half = size // 2
    margin = half + 4
    return {
        "color": color,
        "shape": shape,
        "start": int(start),
        "end": int(start + length),  # exclusive
        "role": role,
        "cx": int(rng.integers(margin, WIDTH - margin)),
        "cy": int(rng.integers(margin, HEIGHT - margin)),
        "size": size,
    }


def _n_sampled(start: int, end: int, total: int) -> int:
    idx = sampled_frame_indices(total)
    return int(np.count_nonzero((idx >= start) & (idx < end)))


def _place(lengths: list[int], lo: int, hi: int, rng: np.random.Generator, min_gap: int = 2) -> list[int]:
    """Random starts of non-overlapping events (in the given order) inside ``[lo, hi)``,
    separated by at least ``min_gap`` empty frames."""
    slack = (hi - lo) - sum(lengths) - min_gap * (len(lengths) - 1)
    if slack < 0:
        raise ValueError("events do not fit")
    # distribute the slack over the len+1 gaps uniformly at random
    cuts = np.sort(rng.integers(0, slack + 1, size=len(lengths)))
    starts, pos, prev = [], lo, 0
    for k, length in enumerate(lengths):
        pos += int(cuts[k] - prev)
        prev = int(cuts[k])
        starts.append(pos)
        pos += length + min_gap
    return starts


def _quarter_event(quarter: int, length: int, total: int, rng: np.random.Generator) -> int:
    q = total // 4
    lo, hi = quarter * q, (quarter + 1) * q
    starts = [s for s in range(lo, hi - length + 1) if _n_sampled(s, s + length, total) >= MIN_SAMPLED_PER_EVENT]
    return int(rng.choice(starts))


def _other_object(rng: np.random.Generator, color: str, shape: str) -> tuple[str, str]:
    """A random object whose colour and shape both differ from (color, shape)."""
    c = [x for x in COLORS if x != color][int(rng.integers(0, len(COLORS) - 1))]
    s = [x for x in SHAPES if x != shape][int(rng.integers(0, len(SHAPES) - 1))]
    return c, s


def _gen_temporal(rng, ans_idx):
    """Two objects (different colour and shape) in two different quarters; when is the named one?"""
    tc, ts = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    dc, ds = _other_object(rng, tc, ts)
    length = int(rng.integers(3, 6))
    start = _quarter_event(ans_idx, length, NUM_FRAMES, rng)
    dq = int(rng.choice([q for q in range(4) if q != ans_idx]))
    dlen = int(rng.integers(3, 6))
    dstart = _quarter_event(dq, dlen, NUM_FRAMES, rng)
    events = [_event(tc, ts, start, length, "target", rng), _event(dc, ds, dstart, dlen, "distractor", rng)]
    return NUM_FRAMES, "quarter", f"When does the {tc} {ts} appear?", list(QUARTER_OPTIONS), events


def _gen_attribute(rng, ans_idx):
    """One object appears once, at a random time; what colour is it?"""
    color, shape = list(COLORS)[ans_idx], str(rng.choice(SHAPES))
    length = int(rng.integers(3, 6))
    starts = [s for s in range(0, NUM_FRAMES - length + 1)]
    start = int(rng.choice(starts))
    events = [_event(color, shape, start, length, "target", rng)]
    return NUM_FRAMES, "color", "What colour is the object?", list(COLORS), events


def _gen_order(rng, ans_idx):
    """Two objects of different colours one after the other; which colour comes first (or last)?"""
    subtype = "first" if rng.random() < 0.5 else "last"
    answer = list(COLORS)[ans_idx]
    other = [c for c in COLORS if c != answer][int(rng.integers(0, len(COLORS) - 1))]
    sa, sb = (str(x) for x in rng.permutation(SHAPES)[:2])
    first, last = ((answer, sa), (other, sb)) if subtype == "first" else ((other, sb), (answer, sa))
    lengths = [int(rng.integers(3, 6)), int(rng.integers(3, 6))]
    starts = _place(lengths, 0, NUM_FRAMES, rng, min_gap=3)
    events = [_event(*first, starts[0], lengths[0], "target", rng), _event(*last, starts[1], lengths[1], "target", rng)]
    return NUM_FRAMES, subtype, f"Which colour appears {subtype}?", list(COLORS), events


def _gen_count(rng, ans_idx):
    """One object appears ``ans_idx + 1`` separate times (3 frames each); how many times?"""
    count = ans_idx + 1
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    starts = _place([3] * count, 0, NUM_FRAMES, rng, min_gap=3)
    events = [_event(color, shape, s, 3, "target", rng) for s in starts]
    return NUM_FRAMES, "count", f"How many times does the {color} {shape} appear?", list(COUNT_OPTIONS), events


def _gen_long(rng, ans_idx, i):
    """64 near-duplicate frames with one short (4-frame) event: when is it, or what colour is it?"""
    length = 4
    if (i // 5) % 2 == 0:
        subtype = "quarter"
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        start = _quarter_event(ans_idx, length, LONG_NUM_FRAMES, rng)
        question, options = f"When does the {color} {shape} appear?", list(QUARTER_OPTIONS)
    else:
        subtype = "color"
        color, shape = list(COLORS)[ans_idx], str(rng.choice(SHAPES))
        starts = [s for s in range(0, LONG_NUM_FRAMES - length + 1)
                  if _n_sampled(s, s + length, LONG_NUM_FRAMES) >= MIN_SAMPLED_PER_EVENT]
        start = int(rng.choice(starts))
        question, options = "What colour is the object?", list(COLORS)
    events = [_event(color, shape, start, length, "target", rng)]
    return LONG_NUM_FRAMES, subtype, question, options, events


def _base_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
    return "test" if split == "default" else split


def _gen_doc(split: str, seed: int, i: int) -> dict[str, Any]:
    base = _base_split(split)
    code = SPLIT_CODE[base]
    rng = np.random.default_rng([seed, code, i])
    ans_idx = _answer_index(seed, code, i)
    qtype = QTYPES[i % len(QTYPES)]
    if qtype == "temporal":
        total, subtype, question, options, events = _gen_temporal(rng, ans_idx)
    elif qtype == "attribute":
        total, subtype, question, options, events = _gen_attribute(rng, ans_idx)
    elif qtype == "order":
        total, subtype, question, options, events = _gen_order(rng, ans_idx)
    elif qtype == "count":
        total, subtype, question, options, events = _gen_count(rng, ans_idx)
    else:
        total, subtype, question, options, events = _gen_long(rng, ans_idx, i)
    assert len(options) == 4 and len(set(options)) == 4

    target_frames = sorted({f for e in events if e["role"] == "target" for f in range(e["start"], e["end"])})
    all_frames = sorted({f for e in events for f in range(e["start"], e["end"])})
    scene = {
        "gray": int(rng.integers(95, 160)),
        "texture_amp": float(rng.uniform(4.0, 10.0)) if qtype != "long" else float(rng.uniform(6.0, 12.0)),
        "kx": float(rng.uniform(0.5, 2.0)),
        "ky": float(rng.uniform(0.5, 2.0)),
        "phase": float(rng.uniform(0, 2 * np.pi)),
        "drift": 0.0 if qtype == "long" else float(rng.uniform(0.02, 0.08)),
        "noise": 1.5 if qtype == "long" else 2.5,
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }
    doc_id = f"synth-{base}-s{seed}-{i:05d}"
    return {
        "id": doc_id,
        "index": i,
        "split": base,
        "seed": int(seed),
        "qtype": qtype,
        "subtype": subtype,
        "question": question,
        "options": options,
        "answer": LETTERS[ans_idx],
        "answer_index": ans_idx,
        "answer_text": options[ans_idx],
        "prompt": format_prompt(question, options),
        "num_frames": total,
        "fps": FPS,
        "height": HEIGHT,
        "width": WIDTH,
        "events": events,
        "event_frames": target_frames,
        "all_event_frames": all_frames,
        "event_start": min(e["start"] for e in events if e["role"] == "target"),
        "scene": scene,
        "video": "",
    }


def generate_docs(split: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Docs of ``split`` (metadata only; ``video`` is empty).  Cheap and deterministic."""
    if n is None:
        n = DEFAULT_N[split]
    _base_split(split)
    return [_gen_doc(split, seed, i) for i in range(int(n))]


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, cx: int, cy: int, size: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(height, width) bool mask of a filled shape of side ``size`` centred at (cx, cy)."""
    yy, xx = np.mgrid[0:height, 0:width]
    dx, dy = xx - cx, yy - cy
    r = size / 2.0
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up, base at the bottom
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= t * r)
    if shape == "cross":
        w = r / 3.0
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(shape)


def render_video(doc: dict[str, Any]) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of a doc (deterministic)."""
    T, H, W = doc["num_frames"], doc["height"], doc["width"]
    sc = doc["scene"]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    t = np.arange(T, dtype=np.float32)[:, None, None]
    # slowly drifting sinusoidal texture on a gray level, slightly bluish, plus sensor noise
    arg = 2 * np.pi * (sc["kx"] * xx / W + sc["ky"] * yy / H) + sc["phase"] + sc["drift"] * t
    base = sc["gray"] + sc["texture_amp"] * np.sin(arg, dtype=np.float32)  # (T, H, W)
    tint = np.array([1.0, 0.97, 1.03], dtype=np.float32)
    rng = np.random.default_rng(sc["noise_seed"])
    img = base[..., None] * tint + rng.standard_normal((T, H, W, 3), dtype=np.float32) * np.float32(sc["noise"])
    for e in doc["events"]:
        m = _shape_mask(e["shape"], e["cx"], e["cy"], e["size"])
        img[e["start"] : e["end"], m] = np.asarray(COLORS[e["color"]], dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB (T, H, W, 3) uint8 -> planar yuv420p (T, H*3/2, W) uint8, BT.601 limited range.

    Done here rather than by PyAV's implicit conversion, whose output was seen to vary
    between runs (so the mp4 bytes were not reproducible)."""
    T, H, W, _ = frames.shape
    rgb = frames.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    sub = rgb.reshape(T, H // 2, 2, W // 2, 2, 3).sum(axis=(2, 4)) * 0.25
    r2, g2, b2 = sub[..., 0], sub[..., 1], sub[..., 2]
    u = 128.0 + (-37.797 * r2 - 74.203 * g2 + 112.0 * b2) / 255.0
    v = 128.0 + (112.0 * r2 - 93.786 * g2 - 18.214 * b2) / 255.0
    y, u, v = (np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v))
    return np.concatenate([y, u.reshape(T, H // 4, W), v.reshape(T, H // 4, W)], axis=1)


def _write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """H.264 (yuv420p) mp4 via PyAV; byte-for-byte reproducible (single thread, fixed CRF,
    explicit colour conversion and timestamps)."""
    import av

    T, H, W, _ = frames.shape
    if H % 4 or W % 2:
        raise ValueError("frame height must be a multiple of 4 and width even")
    tb = Fraction(1, fps)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = W, H
        stream.pix_fmt = "yuv420p"
        stream.time_base = tb
        # mbtree off: with it, x264 output was seen to vary between identical runs
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        yuv = _rgb_to_yuv420p(frames)
        for t in range(T):
            frame = av.VideoFrame.from_ndarray(yuv[t], format="yuv420p")
            frame.pts = t
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_video_atomic(path: Path, frames: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(fd)
    try:
        _write_mp4(Path(tmp), frames)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- cache


def _load_manifest(d: Path, split: str, n: int, seed: int, format_version: int = FORMAT_VERSION) -> list[dict] | None:
    mpath = d / _MANIFEST
    try:
        with open(mpath, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("format_version") != format_version or manifest.get("split") != split or manifest.get("n") != n or manifest.get("seed") != seed:
        return None
    docs = manifest.get("docs")
    if not isinstance(docs, list) or len(docs) != n:
        return None
    out = []
    for doc in docs:
        video = d / doc["video"]
        if not video.is_file() or video.stat().st_size == 0:
            return None
        out.append({**doc, "video": str(video)})
    return out


def ensure_split(split: str, n: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Docs of ``split`` ("train", "test" or "default") with their mp4 files.

    Generated under ``cache_dir`` (default :func:`default_cache_dir`) on first use; the
    manifest is written atomically after all videos, so an interrupted generation is
    redone on the next call.  ``n`` defaults to ``DEFAULT_N[split]``; "default" is the
    first ``n`` (20) docs of "test".  Each returned doc has ``video`` (absolute path),
    ``question``, ``options`` (4 strings), ``answer`` (letter), ``prompt``, ``qtype`` and
    metadata (``events``, ``event_frames``, ``num_frames``...).
    """
    _base_split(split)  # validates
    if n is None:
        n = DEFAULT_N[split]
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    seed = int(seed)
    return materialize_split(split_dir(split, n, seed, cache_dir), split, n, seed, FORMAT_VERSION,
                             generate_docs, render_video)


def materialize_split(d: Path, split: str, n: int, seed: int, format_version: int, generate, render) -> list[dict]:
    """Load the split cached in folder ``d``, or write it there: ``generate(split, n, seed)`` gives the
    docs, ``render(doc)`` each video's frames ``(T, H, W, 3)`` uint8 (an mp4 per doc, then the manifest,
    atomically). Shared by every synthetic benchmark of :mod:`sharp.synthetic`."""
    docs = _load_manifest(d, split, n, seed, format_version)
    if docs is not None:
        return docs

    d.mkdir(parents=True, exist_ok=True)
    vdir = d / "videos"
    vdir.mkdir(exist_ok=True)
    rel_docs = []
    for doc in generate(split, n, seed):
        rel = f"videos/{doc['id']}.mp4"
        _write_video_atomic(d / rel, render(doc))
        rel_docs.append({**doc, "video": rel})
    manifest = {"format_version": format_version, "split": split, "n": n, "seed": seed, "docs": rel_docs}
    _atomic_write_bytes(d / _MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    return [{**doc, "video": str(d / doc["video"])} for doc in rel_docs]


def clear_cache(cache_dir: str | os.PathLike | None = None) -> None:
    """Remove every generated split under ``cache_dir`` (default cache if None)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description="Generate the synthetic video benchmark")
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    docs = ensure_split(a.split, a.n, a.seed, a.cache_dir)
    print(f"{len(docs)} docs in {Path(docs[0]['video']).parent.parent if docs else '-'}")
