"""The videos of a split decoded and preprocessed once by the backbone's own pipeline, stored
losslessly as uint8 (:class:`PixelStore`, :func:`cached_pixels`), and teacher-forced batches
(:func:`make_batch`)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sharp.toy.prompts import ANSWER_END, answer_text, question_text

CACHE_VERSION = 2  # bump when the stored pixel format changes


def default_cache_dir() -> Path:
    """``$SHARP_CACHE/toy`` if ``SHARP_CACHE`` is set, else ``~/.cache/sharp/toy``."""
    root = os.environ.get("SHARP_CACHE")
    return (Path(root).expanduser() if root else Path("~/.cache/sharp").expanduser()) / "toy"


def _vision_key(bb) -> dict:
    return {"kind": bb.kind, "num_frames": bb.num_frames, "video_kwargs": bb.video_kwargs, **bb.vision_settings()}


def _u8_to_pixels(u8, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """The processors' rescale/normalize (float64 * 1/255 -> float32, then (x - mean) / std)."""
    u8 = u8.numpy() if isinstance(u8, torch.Tensor) else u8
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))


def _pixels_to_u8(pixels: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = pixels.numpy().astype(np.float64) * std + mean
    return torch.from_numpy(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))


def video_pixels(bb, video) -> dict:
    """Pixel inputs of one video, exactly as ``bb.prepare(video, question)`` computes them (float32, CPU).

    Returns ``{"pixel_values_videos": ...}`` for one sample (LLaVA-OV: (T, 3, S, S); Qwen2-VL:
    (N, D)) plus ``video_grid_thw`` (1, 3) for Qwen2-VL.
    """
    pixels = bb._to_model(bb.video_pixels(bb.sample_frames(video)))  # prepare's device and dtype
    return {k: (v.cpu().float() if v.is_floating_point() else v.cpu()) for k, v in pixels.items()}


@dataclass
class PixelStore:
    """Preprocessed videos of a list of docs, stored losslessly as uint8 (see :func:`cached_pixels`)."""

    kind: str
    u8: list  # per doc: uint8 tensor, same shape as the pixel tensor
    thw: list  # per doc: (1, 3) LongTensor (Qwen2-VL) or None
    mean: np.ndarray = field(repr=False, default=None)
    std: np.ndarray = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.u8)

    def first(self, n: int) -> "PixelStore":
        """The store of the first ``n`` docs."""
        return PixelStore(self.kind, self.u8[:n], self.thw[:n], self.mean, self.std)

    def pixels(self, i: int) -> dict:
        out = {"pixel_values_videos": _u8_to_pixels(self.u8[i], self.mean, self.std)}
        if self.thw[i] is not None:
            out["video_grid_thw"] = self.thw[i]
        return out


def _cache_file(bb, docs: Sequence[dict], cache_dir: Path) -> tuple[dict, Path]:
    """The identity of a cache entry (backbone video settings, docs) and its file."""
    from sharp.synthetic.benchmark import FORMAT_VERSION

    ident = {"v": CACHE_VERSION, "bench": FORMAT_VERSION, "vision": _vision_key(bb),
             "docs": [(d["id"], os.path.getsize(d["video"])) for d in docs]}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ident, cache_dir / f"{bb.kind}-{len(docs)}-{key}.pt"


def _load_store(bb, path: Path) -> Optional[PixelStore]:
    """The cached store, or None if there is none (or it is corrupt: then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=False)
        mean, std = bb.pixel_mean_std(blob["u8"][0].shape)
        return PixelStore(bb.kind, blob["u8"], blob["thw"], mean, std)
    except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt
        return None


def _preprocess_store(bb, docs: Sequence[dict], verbose: bool) -> PixelStore:
    """Decode + preprocess every doc's video; each is checked to reconstruct exactly from uint8."""
    t0 = time.time()
    u8s, thws = [], []
    mean = std = None
    for i, doc in enumerate(docs):
        px = video_pixels(bb, doc["video"])
        pv = px["pixel_values_videos"]
        if mean is None:
            mean, std = bb.pixel_mean_std(pv.shape)
        u8 = _pixels_to_u8(pv, mean, std)
        if not torch.equal(_u8_to_pixels(u8, mean, std), pv):
            raise RuntimeError(f"pixel cache: {doc['video']} does not reconstruct exactly from uint8")
        u8s.append(u8)
        thws.append(px.get("video_grid_thw"))
        if verbose and (i + 1) % 250 == 0:
            print(f"  preprocessed {i + 1}/{len(docs)} videos ({time.time() - t0:.0f} s)", flush=True)
    return PixelStore(bb.kind, u8s, thws, mean, std)


def _save_store(store: PixelStore, ident: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ident": ident, "u8": store.u8, "thw": store.thw}, tmp)
    os.replace(tmp, path)


def cached_pixels(bb, docs: Sequence[dict], cache_dir=None, verbose: bool = False) -> PixelStore:
    """Decode + preprocess the videos of ``docs`` once (backbone pipeline), cached in ``cache_dir``.

    The cache file is keyed by the backbone's video settings (kind, frames, resolution, patching)
    and the docs (ids and video file sizes); values are the exact pixel tensors of
    ``Backbone.prepare`` (stored as uint8 and checked to reconstruct bit-identically).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ident, path = _cache_file(bb, docs, cache_dir)
    store = _load_store(bb, path)
    if store is None:
        store = _preprocess_store(bb, docs, verbose)
        _save_store(store, ident, path)
    return store


def make_batch(bb, docs: Sequence[dict], store: PixelStore, indices: Sequence[int],
               with_answer: bool = False) -> dict:
    """Model inputs for docs ``indices`` (left-padded); with ``with_answer`` the prompt ends with the
    answer (letter + ``<|im_end|>``) and ``n_answer_tokens`` says how many trailing tokens to score."""
    pxs = [store.pixels(i) for i in indices]
    texts = []
    for i, px in zip(indices, pxs):
        prompt = bb.build_prompt(question_text(docs[i]), bb.n_placeholders(**px))
        texts.append(prompt + (answer_text(docs[i]) + ANSWER_END if with_answer else ""))
    out = bb._tokenize(texts)
    out.update(bb.collate_pixels(pxs))
    out = bb._to_model(out)
    if with_answer:
        out["n_answer_tokens"] = _answer_tokens(bb, docs, indices)
    return out


def _answer_tokens(bb, docs: Sequence[dict], indices: Sequence[int]) -> int:
    """Tokens of the answer + ``<|im_end|>`` (one count for the whole batch)."""
    n_ans = {len(bb.tokenizer(answer_text(docs[i]) + ANSWER_END, add_special_tokens=False)["input_ids"])
             for i in indices}
    if len(n_ans) != 1:
        raise ValueError("answers of one batch must have the same token count")
    return n_ans.pop()
