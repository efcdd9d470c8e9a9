"""ShaRP PosC (Sec. 4.2, Eq. 5): the positional bias b_{i,T} and its cache.

The bias is the same score as a_{i,T} for an all-black video of the same layout, measured by one
probe forward (``StageContext.probe``: the prefill inputs with black pixels, run up to the ShaRP
stage without cache; earlier stages, e.g. a composed VisionZip, are replayed with the tokens they
kept in the real prefill, so the bias has one entry per CURRENT visual token, normalised like the
real scores). Biases are cached per sample, in memory (process-wide LRU) and on disk under
``$SHARP_CACHE/posc/`` (see :mod:`sharp.paths`), under a key that names everything the bias depends
on: backbone, weights fingerprint, dtype, device type, layout, sequence length, padding, the
position of the video in the prompt, the scoring reading, and -- when an earlier stage removed
tokens -- the kept original indices.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

from sharp.paths import cache_dir

POSC_KEYS = ("layout", "prompt")

# version of the bias computation, part of every cache key: bump it whenever the probe or the score
# it reads changes, so a bias computed by older code is never loaded (v2: after the issue-9 probe)
BIAS_VERSION = 2

# bias cache shared by every ShaRP instance of the process: key -> (n_current,) float32 on CPU
_BIAS_MEMORY: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_BIAS_MEMORY_MAX = 4096


def default_cache_dir() -> Path:
    """``$SHARP_CACHE/posc`` (default ``~/.cache/sharp/posc``)."""
    return cache_dir("posc")


def clear_bias_memory() -> None:
    """Forget the in-memory PosC biases (the disk cache is untouched)."""
    _BIAS_MEMORY.clear()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.cpu().numpy().tobytes()).hexdigest()


class BiasCache:
    """PosC biases of one ShaRP instance: memory, then disk (``folder``; None = memory only)."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder

    def keys(self, ctx, reading: str, per_prompt: bool) -> list[str]:
        """One cache key per sample of the current stage context."""
        layout, inputs = ctx.layout, ctx.prefill_inputs
        ids = inputs["input_ids"]
        common = (
            f"v{BIAS_VERSION}|{ctx.model_identity}|"
            f"{layout.n_visual}x{layout.frames}x{layout.tokens_per_frame}x{layout.grid}|s={ids.shape[1]}|"
            f"pos_ids={'position_ids' in inputs}|{reading}")
        keys = []
        for b in range(ids.shape[0]):
            tokens = ctx.visual_tokens(b)
            real = ctx.prefill_inputs.get("attention_mask", torch.ones_like(ids))[b].bool()
            first_visual = ctx.input_video_start(b)
            key = f"{common}|pads={int((~real).sum())}|before={int(real[:first_visual].sum())}"
            if len(tokens) != layout.n_visual:  # an earlier stage removed tokens: the bias is of the kept ones
                key += "|kept=" + _digest(tokens.index)
            if per_prompt:
                key += "|ids=" + _digest(ids[b][real.to(ids.device)])
            keys.append(key)
        return keys

    def _path(self, key: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def load(self, key: str) -> Optional[torch.Tensor]:
        if key in _BIAS_MEMORY:
            _BIAS_MEMORY.move_to_end(key)
            return _BIAS_MEMORY[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("key") == key:
                    return blob["bias"]
            except Exception:  # a corrupt/partial file: recompute
                pass
        return None

    def store(self, key: str, bias: torch.Tensor, write: bool) -> None:
        _BIAS_MEMORY[key] = bias
        _BIAS_MEMORY.move_to_end(key)
        while len(_BIAS_MEMORY) > _BIAS_MEMORY_MAX:
            _BIAS_MEMORY.popitem(last=False)
        path = self._path(key)
        if not write or path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"key": key, "bias": bias}, tmp)
            os.replace(tmp, path)
        except OSError as err:  # read-only cache: keep going with the memory cache
            print(f"sharp: could not write the PosC cache {path}: {err}", file=sys.stderr)


def positional_bias(ctx, score: Callable, cache: BiasCache, reading: str, per_prompt: bool = False,
                    probe: Optional[Callable] = None) -> torch.Tensor:
    """(b, n_max) PosC bias b_{i,T} of every current visual token (0 past a sample's count).

    ``score(ctx) -> (b, s)`` is the same score function as the real a_{i,T}; it is evaluated once in
    a black-video probe for the samples whose key is not cached. ``probe(modify_inputs, fn)``: how to
    run that probe (default ``ctx.probe``; ShaRP passes one that applies its SegM mask there).
    """
    keys = cache.keys(ctx, reading, per_prompt)
    found = {b: bias for b, key in enumerate(keys) if (bias := cache.load(key)) is not None}
    if len(found) < len(keys):
        t0 = ctx.now()

        def measure(pctx):
            scores = score(pctx)
            return [scores[b, pctx.visual_positions(b)].float().cpu() for b in range(scores.shape[0])]

        probed = (probe or ctx.probe)(ctx.black_video, measure)
        ctx.add_time("probe", ctx.now() - t0)
        for b in range(len(keys)):
            if b not in found:
                found[b] = probed[b]
                cache.store(keys[b], probed[b], write=True)
    for b, key in enumerate(keys):
        cache.store(key, found[b], write=False)
    out = torch.zeros(len(keys), max(ctx.visual_counts), device=ctx.hidden_states.device)
    for b in range(len(keys)):
        out[b, : found[b].numel()] = found[b].to(out.device)
    return out
