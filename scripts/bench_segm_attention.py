"""SegM's block-diagonal attention: dense additive/bool mask vs the structured paths, one layer.

    python scripts/bench_segm_attention.py --threads 1                        # mid-size LLaVA-OV shapes
    python scripts/bench_segm_attention.py --device cuda --dtype bfloat16 --heads 28 --kv-heads 4 \\
        --head-dim 128 --visual 6272 --frames 32                              # 7B shapes on a GPU (adds flex)

The attention of one decoder layer whose visual rows may only see their own segment (Eq. 4; text
before the video visible, text after it unrestricted), for 1, 4, 8, 32 equal segments:

* ``dense``: what the engine did before: the ``(1, 1, s, s)`` bool mask (causal AND segments) built
  and passed to sdpa (timed together: the mask is built once per prefill layer);
* ``segments``: ``sharp.engine.masks.segments_attention`` (one sdpa call per segment, lower-right
  causal, no s x s tensor);
* ``flex`` (CUDA only): FlexAttention, compiled, with the block mask built from the segment ids
  (block-mask construction timed too);
* ``causal``: plain causal sdpa, no restriction (vanilla's layer: the floor).

Median of ``--repeats`` after one warm-up; CPU: the thread's CPU time with ``--threads 1``. Every
structured output is checked against the dense one (max abs difference printed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sharp.engine import masks  # noqa: E402


def layout(prefix: int, visual: int, suffix: int, segments: int) -> torch.Tensor:
    seg = torch.full((1, prefix + visual + suffix), -1, dtype=torch.long)
    seg[0, prefix:prefix + visual] = torch.arange(visual) * segments // visual
    return seg


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter

    def timed(fn):
        out = fn()
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((clock() - t0) * 1e3)
        return statistics.median(times), out

    s = args.prefix + args.visual + args.suffix
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, s, args.head_dim, generator=g).to(device, dtype)
    k = torch.randn(1, args.kv_heads, s, args.head_dim, generator=g).to(device, dtype)
    v = torch.randn(1, args.kv_heads, s, args.head_dim, generator=g).to(device, dtype)
    scale = args.head_dim ** -0.5
    module = type("M", (), {"num_key_value_groups": args.heads // args.kv_heads})()
    groups = args.heads // args.kv_heads
    rows = []
    causal_ms, _ = timed(lambda: F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True, scale=scale))
    for n_seg in args.segments:
        seg = layout(args.prefix, args.visual, args.suffix, n_seg).to(device)
        restriction = masks.SegmentRestriction(seg, visual_sees_text=True)

        def dense():
            allowed = restriction.dense() & torch.ones(s, s, dtype=torch.bool, device=device).tril()
            return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                  attn_mask=allowed, scale=scale).transpose(1, 2)

        def structured(mode):
            def fn():
                plan = masks.plan(restriction, None)
                plan.mode = mode
                return masks.segments_attention(module, q, k, v, plan, scaling=scale)[0]
            return fn

        dense_ms, ref = timed(dense)
        row = {"segments": n_seg, "dense_ms": dense_ms, "causal_ms": causal_ms}
        modes = ["segments"] + (["flex"] if device.type == "cuda" else [])
        for mode in modes:
            ms, out = timed(structured(mode))
            row[f"{mode}_ms"] = ms
            row[f"{mode}_max_abs_diff"] = float((out.float() - ref.float()).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "clock": "cpu" if cpu_clock else "wall", "sequence": s, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "repeats": args.repeats, "torch": torch.__version__}
    lines = [f"SegM attention of one layer ({info['device']}, {args.dtype}, sequence {s} = {args.prefix} text + "
             f"{args.visual} visual + {args.suffix} text, {args.heads}/{args.kv_heads} heads x {args.head_dim}; "
             f"{info['clock']} clock, median of {args.repeats})", "",
             "| segments | causal, no SegM ms | dense mask ms | per-segment sdpa ms |" +
             (" flex ms |" if device.type == "cuda" else ""),
             "|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else "")]
    for r in rows:
        lines.append(f"| {r['segments']} | {r['causal_ms']:.1f} | {r['dense_ms']:.1f} | {r['segments_ms']:.1f} |"
                     + (f" {r['flex_ms']:.1f} |" if "flex_ms" in r else ""))
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    return {"info": info, "rows": rows, "table": table}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--prefix", type=int, default=14, help="text tokens before the video")
    p.add_argument("--visual", type=int, default=1568)
    p.add_argument("--suffix", type=int, default=71, help="text tokens after the video")
    p.add_argument("--segments", type=int, nargs="+", default=[1, 4, 8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p


if __name__ == "__main__":
    run(build_parser().parse_args())
