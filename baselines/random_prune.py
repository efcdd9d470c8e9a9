"""Random pruning, a control (the field's: LightCompress ``llmc/compression/token_reduction/random.py``,
``RandomPrune.random_pruning_hook``; image-pruning benchmarks found it a strong baseline).

Once, before decoder layer ``layer`` (default 0: before the LLM), keep a uniformly random
k = round(retention x N_vis) of the visual tokens, one set over the whole video (no per-frame quota):

    keep = sort(randperm(n, generator=seed)[:k])        n = the sample's current visual tokens

drawn from a fresh generator seeded with ``seed`` for every sample of every prefill, so the same seed
and the same token count give the same set (a reproducible control; LightCompress draws from the
global RNG seeded once per run, so its set changes from video to video). Kept tokens keep their
original positions, as LightCompress's hook (position ids = the kept indices). docs/methods/random.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sharp import PruningMethod, Selection, layer_kwarg


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """(k,) ascending indices in 0..n-1: the first k of a permutation drawn from ``seed`` (CPU generator,
    so the set does not depend on the device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


@dataclass
class RandomPrune(PruningMethod):
    """Keep a seeded uniform random round(R x N_vis) of the visual tokens before ``layer``."""

    name = "random"
    seed: int = 42  # LightCompress's example yml base.seed
    layer: int = layer_kwarg(0, scaling="fixed", lowest=0)  # LightCompress's pruning_loc: 0 = before the LLM

    def stages(self, num_layers: int) -> list[int]:
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"random: layer must be in 0..{num_layers - 1}, got {self.layer}")
        return [self.layer]

    def select(self, ctx) -> Selection:
        budgets = ctx.budget(self.retention)
        keep = [random_subset(n, k, self.seed).to(ctx.hidden_states.device)
                for n, k in zip(ctx.visual_counts, budgets)]
        ctx.trace.budget, ctx.trace.seed = budgets, self.seed
        ctx.trace.kept = [ctx.visual_tokens(b).index[i].cpu() for b, i in enumerate(keep)]
        return Selection(keep)
