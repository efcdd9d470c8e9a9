"""Second synthetic benchmark: multi-scene videos with hard cuts (``scenes``, format version 1).

The first benchmark (:mod:`sharp.synthetic.benchmark`) has nearly static 96x96 videos of 32
frames; the toys see them as 128-144 visual tokens. ShaRP's three components address effects
that need more room: attention leaking across scene boundaries (SegM), a positional bias over long
visual sequences (PosC), a few tokens soaking up attention (RegD). This benchmark gives them that
room: 168x168 videos of 32 frames (2 fps) cut into four scenes, which the toys
``toy_scenes_llava_onevision`` / ``toy_scenes_qwen2_vl`` see as 512 / 576 visual tokens.

Video: four scenes with hard cuts. Each scene has its own background (one of ``BACKGROUNDS``,
a permutation over the scenes; a different texture and noise too) and lasts an even number of
frames (6-14, 32 in all), so that each Qwen2-VL temporal patch (2 frames) lies inside one scene.
Objects are the first benchmark's coloured shapes (``COLORS``, ``SHAPES``).

Question types (``qtype``), cycled by document index; options are always the four colours in
the fixed order red, green, blue, yellow (the letter follows from the content):

``scene``  one object per scene (four colours, one each), each visible for part of its scene:
           "What colour is the object in the purple scene?" (needs one scene);
``order``  the same kind of video: "What colour is the object in the third scene?"
           (needs the order of the scenes: the cuts are at random frames);
``cut``    one object stays in place across a cut (at least 3 frames on each side), the two
           scenes away from that cut have an object each, wholly inside them:
           "What colour is the object that stays across a cut?" (an event spanning a cut).

Determinism: document ``i`` of split ``s`` with seed ``k`` comes from
``np.random.default_rng([k, SPLIT_CODE[s], 7, i])`` only (the 7 keeps its streams apart from the
first benchmark's); the answer letter is balanced per question type over docs ``12b..12b+11``.
Cache: ``<cache>/scenes/v<FORMAT_VERSION>/<split>_seed<seed>_n<n>/`` (same layout and mp4 writer
as the first benchmark, :func:`sharp.synthetic.benchmark.materialize_split`).

lmms-eval tasks: ``sharp_scenes`` (the 200-doc test split; ``tasks=scenes_test``, the default task of
both scenes toys: ``python run.py backbone=toy_scenes_llava_onevision``) and ``sharp_scenes_default``
(its first 24 docs; ``tasks=scenes``), in ``sharp/synthetic/lmms_task`` with the first benchmark's
prompt, answer parser and generation settings; per question type metrics ``accuracy_<qtype>``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sharp.synthetic.benchmark import (
    ANSWER_INSTRUCTION,
    COLORS,
    LETTERS,
    SHAPES,
    SPLIT_CODE,
    _base_split,
    _shape_mask,
    format_prompt,
    materialize_split,
)

__all__ = [
    "ANSWER_INSTRUCTION", "BACKGROUNDS", "DEFAULT_N", "FORMAT_VERSION", "QTYPES", "SCENE_ORDINALS", "SPLITS",
    "ensure_split", "generate_docs", "render_video", "split_dir", "frames_digest",
]

FORMAT_VERSION = 1
NAME = "scenes"
QTYPES = ("scene", "order", "cut")
SPLITS = ("train", "test", "default")
DEFAULT_N = {"train": 1000, "test": 200, "default": 24}

HEIGHT = WIDTH = 168
NUM_FRAMES = 32
FPS = 2
NUM_SCENES = 4
MIN_SCENE_FRAMES = 6
SCENE_ORDINALS = ("first", "second", "third", "last")
# Background base colours (RGB), none close to an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "purple": (105, 55, 125),
    "brown": (105, 75, 40),
    "teal": (25, 95, 100),
}
_STREAM = 7  # mixed into the seed: this benchmark's random streams differ from the first one's


def default_cache_dir() -> Path:
    """``scenes/`` under the first benchmark's cache folder (``$SHARP_CACHE/synthetic/scenes``)."""
    from sharp.synthetic.benchmark import default_cache_dir as base

    return base() / NAME


def split_dir(split: str, n: int, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir).expanduser() / NAME if cache_dir is not None else default_cache_dir()
    return base.resolve() / f"v{FORMAT_VERSION}" / f"{split}_seed{seed}_n{n}"


# ----------------------------------------------------------------------------- doc generation


def _answer_index(seed: int, code: int, i: int) -> int:
    """Letter of doc ``i``: per question type, each letter once in every block of 12 docs."""
    perm = np.random.default_rng([seed, code, _STREAM, 10**9 + i // 12]).permutation(4)
    return int(perm[(i // len(QTYPES) + i % len(QTYPES)) % 4])


def _scene_bounds(rng: np.random.Generator) -> list[tuple[int, int]]:
    """Four ``(start, end)`` frame ranges (end exclusive), even lengths >= 6, covering 32 frames."""
    extra_pairs = (NUM_FRAMES - NUM_SCENES * MIN_SCENE_FRAMES) // 2
    extra = rng.multinomial(extra_pairs, [1 / NUM_SCENES] * NUM_SCENES) * 2
    lengths = MIN_SCENE_FRAMES + extra
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [(int(s), int(s + n)) for s, n in zip(starts, lengths)]


def _object(color: str, start: int, end: int, role: str, rng: np.random.Generator) -> dict:
    size = int(rng.integers(40, 57))  # side in pixels: about one LLaVA-OV token cell (42 px) or more
    margin = size // 2 + 6
    return {"color": color, "shape": str(rng.choice(SHAPES)), "start": int(start), "end": int(end), "role": role,
            "cx": int(rng.integers(margin, WIDTH - margin)), "cy": int(rng.integers(margin, HEIGHT - margin)),
            "size": size}


def _inside(scene: tuple[int, int], rng: np.random.Generator, min_len: int = 4) -> tuple[int, int]:
    """A random interval of at least ``min_len`` frames inside a scene."""
    s, e = scene
    length = int(rng.integers(min_len, e - s + 1))
    start = int(rng.integers(s, e - length + 1))
    return start, start + length


def _one_object_per_scene(rng, scenes, answer_color: str, target_scene: int) -> list[dict]:
    others = [c for c in COLORS if c != answer_color]
    colors = [str(c) for c in rng.permutation(others)]
    colors.insert(target_scene, answer_color)
    return [_object(c, *_inside(sc, rng), "target" if k == target_scene else "distractor", rng)
            for k, (c, sc) in enumerate(zip(colors, scenes))]


def _gen_doc(split: str, seed: int, i: int) -> dict[str, Any]:
    base = _base_split(split)
    code = SPLIT_CODE[base]
    rng = np.random.default_rng([seed, code, _STREAM, i])
    ans_idx = _answer_index(seed, code, i)
    answer_color = list(COLORS)[ans_idx]
    qtype = QTYPES[i % len(QTYPES)]
    scenes = _scene_bounds(rng)
    backgrounds = [str(b) for b in rng.permutation(list(BACKGROUNDS))]
    if qtype in ("scene", "order"):
        target = int(rng.integers(0, NUM_SCENES))
        events = _one_object_per_scene(rng, scenes, answer_color, target)
        if qtype == "scene":
            subtype, question = backgrounds[target], f"What colour is the object in the {backgrounds[target]} scene?"
        else:
            subtype, question = SCENE_ORDINALS[target], f"What colour is the object in the {SCENE_ORDINALS[target]} scene?"
    else:  # cut: one object spans the cut between scenes k and k+1
        k = int(rng.integers(0, NUM_SCENES - 1))
        cut = scenes[k + 1][0]
        before = int(rng.integers(3, scenes[k][1] - scenes[k][0] - 1))
        after = int(rng.integers(3, scenes[k + 1][1] - scenes[k + 1][0] - 1))
        events = [_object(answer_color, cut - before, cut + after, "target", rng)]
        others = [str(c) for c in rng.permutation([c for c in COLORS if c != answer_color])]
        away = [j for j in range(NUM_SCENES) if j not in (k, k + 1)]
        events += [_object(c, *_inside(scenes[j], rng), "distractor", rng) for c, j in zip(others, away)]
        subtype, question = f"cut{k + 1}", "What colour is the object that stays across a cut?"
        target = k
    options = list(COLORS)
    scene_style = [{"background": b, "kx": float(rng.uniform(0.5, 3.0)), "ky": float(rng.uniform(0.5, 3.0)),
                    "phase": float(rng.uniform(0, 2 * np.pi)), "texture_amp": float(rng.uniform(6.0, 14.0)),
                    "start": s, "end": e} for b, (s, e) in zip(backgrounds, scenes)]
    target_frames = sorted({f for e in events if e["role"] == "target" for f in range(e["start"], e["end"])})
    return {
        "id": f"{NAME}-{base}-s{seed}-{i:05d}",
        "benchmark": NAME,
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
        "num_frames": NUM_FRAMES,
        "fps": FPS,
        "height": HEIGHT,
        "width": WIDTH,
        "scenes": scene_style,
        "cuts": [s for s, _ in scenes[1:]],
        "target_scene": target,
        "events": events,
        "event_frames": target_frames,
        "all_event_frames": sorted({f for e in events for f in range(e["start"], e["end"])}),
        "event_start": min(e["start"] for e in events if e["role"] == "target"),
        "noise": 3.0,
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
        "video": "",
    }


def generate_docs(split: str, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Docs of ``split`` (metadata only; ``video`` is empty). Cheap and deterministic."""
    if n is None:
        n = DEFAULT_N[split]
    _base_split(split)
    return [_gen_doc(split, seed, i) for i in range(int(n))]


def scene_of_frame(doc: dict) -> np.ndarray:
    """(num_frames,) int: the scene index (0..3) of every frame of the video file."""
    out = np.zeros(doc["num_frames"], np.int64)
    for k, sc in enumerate(doc["scenes"]):
        out[sc["start"]:sc["end"]] = k
    return out


# ----------------------------------------------------------------------------- rendering


def render_video(doc: dict[str, Any]) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of a doc (deterministic): per scene a textured background of its
    colour, objects drawn on top, sensor noise everywhere."""
    T, H, W = doc["num_frames"], doc["height"], doc["width"]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.empty((T, H, W, 3), np.float32)
    for sc in doc["scenes"]:
        texture = sc["texture_amp"] * np.sin(2 * np.pi * (sc["kx"] * xx / W + sc["ky"] * yy / H) + sc["phase"],
                                             dtype=np.float32)  # (H, W)
        img[sc["start"]:sc["end"]] = np.asarray(BACKGROUNDS[sc["background"]], np.float32) + texture[..., None]
    rng = np.random.default_rng(doc["noise_seed"])
    img += rng.standard_normal((T, H, W, 3), dtype=np.float32) * np.float32(doc["noise"])
    for e in doc["events"]:
        m = _shape_mask(e["shape"], e["cx"], e["cy"], e["size"], H, W)
        img[e["start"]:e["end"], m] = np.asarray(COLORS[e["color"]], dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def frames_digest(docs) -> str:
    """sha256 (hex) of the rendered frames of ``docs`` in order (what the determinism test pins)."""
    import hashlib

    h = hashlib.sha256()
    for d in docs:
        h.update(render_video(d).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- cache


def ensure_split(split: str, n: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Docs of ``split`` ("train", "test" or "default" = the first 24 of "test") with their mp4 files,
    generated on first use (see :func:`sharp.synthetic.benchmark.ensure_split`)."""
    _base_split(split)
    n = int(DEFAULT_N[split] if n is None else n)
    if n < 0:
        raise ValueError("n must be >= 0")
    return materialize_split(split_dir(split, n, int(seed), cache_dir), split, n, int(seed), FORMAT_VERSION,
                             generate_docs, render_video)
