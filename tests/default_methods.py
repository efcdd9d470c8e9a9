"""Every method the invariant tests run (tests/test_methods.py), as kvpress's default_presses.

Each registered method (names starting with "_" are test-only and skipped) runs on the 4-layer tiny
backbones with its defaults resolved for the backbone (``sharp.resolve_method``: the paper's layers
mapped to 4 layers, automatic positions), plus the kwargs below where a test needs them: a new method
gets the invariants by being registered. Compositions are listed explicitly (they have no registry name).
"""
from __future__ import annotations

import sharp

# kwargs the invariant tests need on top of the resolved defaults
TINY_KWARGS: dict[str, dict] = {
    "sharp": {"cache_dir": ""},
    # holitom compacts its pre-LLM stage only, ShaRP keeps positions (the reference numbers each layer
    # by its last compacting stage; tests/test_holitom.py checks the mixed case on its own too)
    "holitom_sharp": {"sharp": {"cache_dir": ""}},
    # the memory stage drops KV in decode only, which the generic reference cannot replay (it drops
    # layer 3 of tiny_llava_onevision at M = 0.2): tests/test_sharpv.py checks it against its own
    "sharpv": {"memory_threshold": 0.0},
    # visionzip compacts, ShaRP keeps positions: the mixed case is checked in tests/test_visionzip.py
    "visionzip_sharp": {"visionzip": {"positions": "original"}, "sharp": {"cache_dir": ""}},
}

def resolved(name: str, kwargs: dict, retention: float, backbone) -> "sharp.PruningMethod":
    """The case's method made for ``backbone`` (a name or a Backbone), as ``sharp.prune`` would run it."""
    return sharp.resolve_method(name, backbone, retention, **kwargs).method


# compositions of what exists, with per-child kwargs
COMPOSITIONS: dict[str, dict] = {
    "fastv+sharp": {"fastv": {"layer": 1, "retention": 0.5}, "sharp": {"layer": 2, "cache_dir": ""}},
    "fastv+fastv": {"fastv@1": {"layer": 1, "retention": 0.5}, "fastv@2": {"layer": 3}},
    "sharpv+fastv": {"sharpv": {"mode": "fixed", "retention": 0.5, "memory_threshold": 0.0}, "fastv": {"layer": 2}},
}


# further readings worth running through the invariants: id -> (method, kwargs)
VARIANTS: dict[str, tuple[str, dict]] = {
    # no merging: the reference then checks SegM's mask in layer 0 on its own
    "sharp-drop": ("sharp", {"absorb": "drop", "cache_dir": ""}),
    "sharp-stage-segm2": ("sharp", {"score_at": "stage", "layer": 2, "segm_layers": 2, "absorb": "drop",
                                    "cache_dir": ""}),
    # static windows on random videos (low T), official rounding, clustered dynamic tokens, NO_BETA
    "holitom-static": ("holitom", {"tau": 0.3, "rounding": "official",
                                   "dynamic_cluster_share": 0.5, "cluster_merge": "mean"}),
    "sharpv-fixed": ("sharpv", {"mode": "fixed", "memory_threshold": 0.0}),
    "visionzip-video": ("visionzip", {"scope": "video", "positions": "original"}),
    # an explicit layer the depth rule would have moved: user values are never mapped
    "pdrop-explicit": ("pdrop", {"layers": [2, 3]}),
    # the field methods' other readings: PruMerge+'s adaptive IQR count (measured schedule), DivPrune
    # without repeated picks, random as an in-LLM control (a stage inside the model, original positions)
    "prumerge_plus-adaptive": ("prumerge_plus", {"mode": "adaptive"}),
    "divprune-distinct": ("divprune", {"repeats": "distinct", "distance_dtype": "float32"}),
    "random-layer2": ("random", {"layer": 2}),
    # PruneVid: every row at its own slot (LLaVA too); static cells (tau 0.5) and clustering on the 16-token
    # tiny frames (sets above 4 tokens), the official alpha given explicitly, stage 2 after layer 2
    "prunevid-original": ("prunevid", {"positions": "original", "density_noise": 0.0}),
    "prunevid-static-clustered": ("prunevid", {"tau": 0.5, "cluster_above": 4, "alpha": 0.4, "layer": 2}),
    # STTM: spatial merging on the 4 x 4 grids (root level 0), the corrected stop test with patch-weighted
    # means; the 7B's in-LLM stage at layer 2 (LLaVA: compact positions from there); spatial-only
    "sttm-root0-masked": ("sttm", {"root_level": 0, "invalid_child_slots": "masked", "weighted_average": True}),
    "sttm-layer2": ("sttm", {"layer": 2, "root_level": 0}),
    "sttm-spatial": ("sttm", {"root_level": 0, "tau_t": -1.0}),
    # FlashVID: the whole video one segment (TSTM trees across frames, the floor rule, DPC-kNN on the
    # roots) with the subtree-mean denominator and ADTS v1; and original positions on LLaVA
    "flashvid-tstm": ("flashvid", {"do_segment": False, "merge_denominator": "subtree", "token_selection": "attn_div"}),
    "flashvid-original": ("flashvid", {"min_segments": 2, "positions": "original"}),
    # DyCoke: every decode step re-selects (strict threshold), all visual entries scored, spatial order,
    # a similar step keeping the previous selection
    "dycoke-reselect": ("dycoke", {"similarity_threshold": 0.9999, "scored_span": "all"}),
    "dycoke-previous": ("dycoke", {"similar_steps": "previous", "frame_order": "spatial", "kv_prune_ratio": 0.5}),
}


def method_cases() -> list[tuple[str, str, dict]]:
    """(test id, method name, kwargs) of every case."""
    names = [n for n in sharp.method_names() if not n.startswith("_")]
    cases = [(n, n, TINY_KWARGS.get(n, {})) for n in names]
    cases += [(n, n, kw) for n, kw in COMPOSITIONS.items()]
    return cases + [(i, n, kw) for i, (n, kw) in VARIANTS.items()]
