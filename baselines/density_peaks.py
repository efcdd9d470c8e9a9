"""Density-peak scores with k-nearest-neighbour density: the step HoliTom's (``cluster_dpc_knn``) and
FastVID's official code share (Rodriguez & Laio's density peaks; both repositories' DPC-kNN).

For a group of m tokens with pairwise distances dist (m, m):

    rho_i   = exp(-mean of the k smallest dist_i^2) + noise_i      (the k nearest include i itself)
    delta_i = min { dist_ij : rho_j > rho_i }                     (the group's largest distance for the densest)
    score_i = rho_i x delta_i

A token with a high score is dense and far from anything denser: a cluster centre (HoliTom) or an
anchor (FastVID). The distances are the caller's (both divide Euclidean distances by sqrt(d)).
"""
from __future__ import annotations

import torch


def density_peak_scores(dist: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
    """dist: (..., m, m) float32 distances of each group; noise: (..., m) added to rho (the official
    rand x 1e-6 tie-break). Returns (..., m) rho x delta."""
    nearest = torch.topk(dist, min(k, dist.shape[-1]), dim=-1, largest=False).values  # (..., m, k)
    rho = torch.exp(-(nearest ** 2).mean(dim=-1)) + noise  # (..., m)
    denser = rho[..., None, :] > rho[..., :, None]  # [..., i, j]: j is denser than i
    farthest = dist.flatten(-2).max(dim=-1).values[..., None, None]  # (..., 1, 1)
    delta = torch.where(denser, dist, farthest).min(dim=-1).values
    return rho * delta
