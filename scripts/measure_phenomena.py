#!/usr/bin/env python
"""Measure the three effects ShaRP is built on, in a trained toy (docs/toy.md, issue 22).

    python scripts/measure_phenomena.py --backbone toy_scenes_llava_onevision --n 24
    python scripts/measure_phenomena.py --backbone toy_llava_onevision --n 24 --out results/phenomena

Nothing is injected: every number is read from the unpruned model on the first ``--n`` docs of its
benchmark's test split (``sharp.toy.toy_benchmark``), averaged over the docs.

1. Positional bias (Fig. 2, PosC): the last token's attention over the visual positions in the shallow
   layer (ShaRP's scoring layer, 1) and a deep one (3/4 down), as ``scripts/show_attention.py`` draws
   it (``sharp.figures.attention.measure_attention``: real video, and an all-black video of the same
   layout through PosC's own probe); reported: the share of the visual attention mass on the last 10%
   of the visual positions (uniform: 10%).
2. Cross-segment attention (SegM): in layers 0 (the layer SegM masks), 1 and the deep one, each visual
   query's attention to visual keys of OTHER scenes, as a share of its attention to visual keys, mean
   over the visual queries outside the first scene; without SegM (the model as trained) and inside
   ``sharp.prune(..., "sharp", 1.0)`` (SegM's mask in layer 0, nothing pruned). Scenes: the true scenes
   of a multi-scene doc; for a doc of the first benchmark (no cuts), the segments of Eq. 3. Also the
   share a uniform causal attention would give (reference), and how Eq. 3's boundaries match the cuts.
   Read from eager attention weights (``output_attentions``) of a second copy of the toy loaded eager.
3. Register-like tokens (RegD): the share of the last token's visual attention mass on the top 1% of
   the visual tokens (uniform: 1%), shallow and deep layer.

Writes ``phenomena_<backbone>.json`` (per doc and mean) to ``--out`` (default results/phenomena).
``--table`` writes ``phenomena.md`` there instead: every measured backbone side by side (docs/toy.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp  # noqa: E402
from sharp import toy  # noqa: E402
from sharp.figures import attention  # noqa: E402


def tail_share(values: np.ndarray, tail: float = 0.1) -> float:
    """Share of the (non-negative) mass of ``values`` (n,) on its last ``ceil(tail * n)`` entries."""
    k = max(1, math.ceil(tail * values.size))
    return float(values[-k:].sum() / values.sum())


def top_share(values: np.ndarray, top: float = 0.01) -> float:
    """Share of the mass of ``values`` (n,) on its ``ceil(top * n)`` largest entries."""
    k = max(1, math.ceil(top * values.size))
    return float(np.sort(values)[-k:].sum() / values.sum())


def token_scenes(bb, doc: dict, layout) -> np.ndarray | None:
    """(n_visual,) true scene of every visual token of a multi-scene doc (its frame's, or for Qwen2-VL
    its temporal patch's first frame); None for a doc without scenes."""
    if "scenes" not in doc:
        return None
    from sharp.synthetic.scenes import scene_of_frame

    frames = toy.sampled_frames(bb, doc)  # (F, k)
    return np.repeat(scene_of_frame(doc)[frames[:, 0]], layout.tokens_per_frame)


def cross_segment_share(attn: torch.Tensor, visual_positions: np.ndarray, scene: np.ndarray) -> tuple[float, float]:
    """(measured, uniform) share of visual->visual attention that crosses scenes.

    attn: (heads, s, s) one layer's attention weights of one sample; visual_positions: (n,) sequence
    positions of the visual tokens; scene: (n,) scene of each. Mean over the visual queries that have
    an earlier scene; the measured share averages the heads; the uniform one is what attention spread
    evenly over the causally visible visual keys would give."""
    a = attn.float().mean(0)[visual_positions][:, visual_positions].numpy()  # (n, n) query x key
    other = scene[:, None] != scene[None, :]
    causal = np.tril(np.ones_like(other, dtype=bool))
    rows = np.nonzero(scene > scene.min())[0]
    measured = (a * other).sum(1)[rows] / a.sum(1)[rows]
    uniform = (other & causal).sum(1)[rows] / causal.sum(1)[rows]
    return float(measured.mean()), float(uniform.mean())


def boundary_match(segments, scene_of_token: np.ndarray, tokens_per_frame: int) -> dict:
    """Eq. 3's boundaries (frame starts of its segments but the first) against the true cuts (frames
    of the visual layout where the scene changes): counts and recall/precision."""
    scene_of_frame = scene_of_token[::tokens_per_frame]
    true = {i for i in range(1, len(scene_of_frame)) if scene_of_frame[i] != scene_of_frame[i - 1]}
    found = {first for first, _ in segments[1:]}
    hit = len(true & found)
    return {"true_cuts": len(true), "eq3_boundaries": len(found), "matched": hit}


def measure_doc(bb, bb_eager, doc: dict, inputs: dict, layers: tuple) -> dict:
    shallow, deep = layers
    layout = bb.layout(inputs)
    maps = attention.measure_attention(bb, inputs, layers)
    out = {"id": doc["id"], "qtype": doc["qtype"]}
    for name, k in (("shallow", shallow), ("deep", deep)):
        real, black = maps[k]["real"].numpy(), maps[k]["black"].numpy()
        out[f"last10_real_{name}"] = tail_share(real)
        out[f"last10_black_{name}"] = tail_share(black)
        out[f"top1_real_{name}"] = top_share(real)
    visual_positions = bb.visual_mask(inputs["input_ids"], layout)[0].nonzero().flatten().numpy()
    scene = token_scenes(bb, doc, layout)
    with torch.no_grad():
        plain = bb_eager.model(**inputs, use_cache=False, output_attentions=True).attentions
        with sharp.prune(bb_eager, "sharp", 1.0) as trace:
            masked = bb_eager.model(**inputs, use_cache=False, output_attentions=True).attentions
        segments = trace.method("sharp").segments[0]
    if scene is None:  # no cuts: the segments of Eq. 3 stand for the scenes
        from sharp.methods.segm import token_segment_ids

        scene = token_segment_ids(segments, layout.tokens_per_frame).numpy()
    else:
        out.update(boundary_match(segments, scene, layout.tokens_per_frame))
    out["segments"] = len(segments)
    for k in sorted({0, shallow, deep}):
        if scene.max() == scene.min():
            out[f"cross_plain_L{k}"] = out[f"cross_segm_L{k}"] = out[f"cross_uniform_L{k}"] = float("nan")
            continue
        out[f"cross_plain_L{k}"], out[f"cross_uniform_L{k}"] = cross_segment_share(plain[k][0], visual_positions, scene)
        out[f"cross_segm_L{k}"], _ = cross_segment_share(masked[k][0], visual_positions, scene)
    return out


# (row label, key in "mean", format) of the side-by-side table; {s}/{d}: the shallow / deep layer
TABLE_ROWS = [
    ("visual tokens", "n_visual", "{:d}"),
    ("layers (shallow, deep)", "layers", "{}"),
    ("1. last 10% share, shallow, real video", "last10_real_shallow", "{:.1%}"),
    ("1. last 10% share, shallow, black video", "last10_black_shallow", "{:.1%}"),
    ("1. last 10% share, deep, real video", "last10_real_deep", "{:.1%}"),
    ("1. last 10% share, deep, black video", "last10_black_deep", "{:.1%}"),
    ("2. cross-segment share, layer 0, no SegM", "cross_plain_L0", "{:.1%}"),
    ("2. cross-segment share, layer 0, SegM", "cross_segm_L0", "{:.1%}"),
    ("2. cross-segment share, shallow, no SegM", "cross_plain_L{s}", "{:.1%}"),
    ("2. cross-segment share, shallow, SegM in layer 0", "cross_segm_L{s}", "{:.1%}"),
    ("2. cross-segment share, uniform causal attention", "cross_uniform_L0", "{:.1%}"),
    ("2. Eq. 3 segments per video (true scenes: 4 on scenes toys)", "segments", "{:.2f}"),
    ("2. Eq. 3 boundaries on a true cut, per video (of 3)", "matched", "{:.2f}"),
    ("3. top 1% share, shallow", "top1_real_shallow", "{:.1%}"),
    ("3. top 1% share, deep", "top1_real_deep", "{:.1%}"),
]


def side_by_side(results: list[dict]) -> str:
    """Markdown: one column per measured backbone (``phenomena_<backbone>.json`` contents), TABLE_ROWS."""
    head = "| measurement | " + " | ".join(r["backbone"] for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for label, key, fmt in TABLE_ROWS:
        cells = []
        for r in results:
            shallow, deep = r["layers"]
            k = key.format(s=shallow, d=deep)
            value = r.get(k, r["mean"].get(k))
            cells.append("—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path) -> Path:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("phenomena_*.json"))]
    if not results:
        raise SystemExit(f"error: no phenomena_*.json in {out}; run the script with --backbone first")
    path = out / "phenomena.md"
    path.write_text(side_by_side(results))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="a trained toy (required unless --table)")
    ap.add_argument("--table", action="store_true", help="write phenomena.md from the JSON files in --out")
    ap.add_argument("--n", type=int, default=24, help="first docs of the test split")
    ap.add_argument("--layers", nargs=2, type=int, default=None, metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "results" / "phenomena"))
    args = ap.parse_args(argv)
    if args.table:
        print(write_table(Path(args.out)).read_text())
        return 0
    if args.backbone is None:
        ap.error("--backbone is required (or --table)")
    torch.set_num_threads(args.threads)

    t0 = time.time()
    bb = sharp.load_backbone(args.backbone, device="cpu")
    bb_eager = sharp.load_backbone(args.backbone, device="cpu", attn_implementation="eager")
    layers = tuple(args.layers) if args.layers else attention.default_layers(bb)
    docs = toy.toy_benchmark(args.backbone).ensure_split("test", n=args.n)
    store = toy.cached_pixels(bb, docs)
    rows = [measure_doc(bb, bb_eager, d, toy.make_batch(bb, docs, store, [i]), layers) for i, d in enumerate(docs)]
    keys = [k for k in rows[0] if isinstance(rows[0][k], (float, int)) and k not in ("id",)]
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    n_visual = bb.layout(toy.make_batch(bb, docs, store, [0])).n_visual
    result = {"backbone": args.backbone, "layers": list(layers), "num_layers": bb.num_layers, "n": len(docs),
              "n_visual": n_visual, "mean": mean, "docs": rows, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"phenomena_{args.backbone}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.backbone}: layers {layers}, {n_visual} visual tokens, {len(docs)} docs")
    for k, v in mean.items():
        print(f"  {k:>24s} {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
