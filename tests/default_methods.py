"""Every method the invariant tests run (tests/test_methods.py), as kvpress's default_presses.

Each registered method (names starting with "_" are test-only and skipped) runs with the kwargs
below on the 4-layer tiny backbones, or with its defaults if it has no entry: a new method gets the
invariants by being registered. Compositions are listed explicitly (they have no registry name).
"""
from __future__ import annotations

import sharp

# kwargs that fit the 4-layer tiny backbones (defaults are the 7B paper settings)
TINY_KWARGS: dict[str, dict] = {
    "fastv": {"layer": 2},
    "pdrop": {"layers": [1, 2, 3]},  # the 7B defaults (4, 16, 24) do not fit 4 layers
    "feather": {"layer": 2},
    "sharp": {"cache_dir": ""},
    "holitom": {"llm_layer": 2},  # the in-LLM stage before layer 18 of 28 -> 2 of 4
    # holitom compacts its pre-LLM stage only, ShaRP keeps positions (the reference numbers each layer
    # by its last compacting stage; tests/test_holitom.py checks the mixed case on its own too)
    "holitom_sharp": {"sharp": {"layer": 2, "cache_dir": ""}},
    # the memory stage drops KV in decode only, which the generic reference cannot replay (it drops
    # layer 3 of tiny_llava_onevision at M = 0.2): tests/test_sharpv.py checks it against its own
    "sharpv": {"memory_threshold": 0.0},
    # visionzip compacts, ShaRP keeps positions: the mixed case is checked in tests/test_visionzip.py
    "visionzip_sharp": {"visionzip": {"positions": "original"}, "sharp": {"cache_dir": ""}},
}

# per-backbone overrides on top of TINY_KWARGS (Qwen2-VL's M-RoPE has no compact positions)
BACKBONE_KWARGS: dict[tuple[str, str], dict] = {
    ("pdrop", "tiny_qwen2_vl"): {"positions": "original"},
    ("holitom", "tiny_qwen2_vl"): {"positions": "original"},
    ("holitom_sharp", "tiny_qwen2_vl"): {"holitom": {"positions": "original"}},
    ("visionzip", "tiny_qwen2_vl"): {"positions": "original"},
}


def kwargs_for(name: str, kwargs: dict, backbone: str) -> dict:
    """The case's kwargs with the backbone's overrides for that method."""
    return {**kwargs, **BACKBONE_KWARGS.get((name, backbone), {})}


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
    "holitom-static": ("holitom", {"llm_layer": 2, "tau": 0.3, "rounding": "official",
                                   "dynamic_cluster_share": 0.5, "cluster_merge": "mean"}),
    "sharpv-fixed": ("sharpv", {"mode": "fixed", "memory_threshold": 0.0}),
    "visionzip-video": ("visionzip", {"scope": "video", "positions": "original"}),
}


def method_cases() -> list[tuple[str, str, dict]]:
    """(test id, method name, kwargs) of every case."""
    names = [n for n in sharp.method_names() if not n.startswith("_")]
    cases = [(n, n, TINY_KWARGS.get(n, {})) for n in names]
    cases += [(n, n, kw) for n, kw in COMPOSITIONS.items()]
    return cases + [(i, n, kw) for i, (n, kw) in VARIANTS.items()]
