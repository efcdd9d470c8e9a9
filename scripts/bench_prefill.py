"""Prefill latency of vanilla vs a pruning method, beside the FLOPs ratio (Table 4 style).

CPU default: the mid-size random-weight LLaVA-OV config (1568 visual tokens, seconds per prefill).
GPU, paper size: ``--backbone llava_onevision_7b --random-weights --frames 32``.

Prints median milliseconds over ``--repeats`` runs after ``--warmup`` runs: the whole prefill
forward (vision tower included) and the language-model part alone, the method's selection time
(and its per-step breakdown from ``trace.stage_times``), the measured speedup and the FLOPs ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sharp
from sharp.flops import prefill_tflops


# the engine's own trace.stage_times keys; every other key is a method's step inside select / mask
ENGINE_KEYS = ("prefill", "llm", "forward", "select", "mask")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_prefill(bb, inputs, repeats, warmup, prune_ctx=None):
    """Median (total_ms, llm_ms, stage_times) of prefill forwards."""
    lm = bb.language_model
    marks = {}

    def pre(module, args, kwargs):
        _sync(bb.device)
        marks["lm0"] = time.perf_counter()

    def post(module, args, kwargs, out):
        _sync(bb.device)
        marks["lm1"] = time.perf_counter()

    h1 = lm.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = lm.register_forward_hook(post, with_kwargs=True)
    totals, llms, stages = [], [], []
    try:
        for i in range(warmup + repeats):
            ctx = prune_ctx() if prune_ctx else None
            trace = ctx.__enter__() if ctx else None
            try:
                _sync(bb.device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    bb.model(**inputs, use_cache=True)
                _sync(bb.device)
                t1 = time.perf_counter()
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
            if i >= warmup:
                totals.append((t1 - t0) * 1e3)
                llms.append((marks["lm1"] - marks["lm0"]) * 1e3)
                stages.append(dict(trace.stage_times) if trace else {})
    finally:
        h1.remove()
        h2.remove()
    med_stage = {k: statistics.median(s.get(k, 0.0) for s in stages) * 1e3 for k in (stages[0] if stages else {})}
    return statistics.median(totals), statistics.median(llms), med_stage, trace


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mid_llava_onevision")
    p.add_argument("--random-weights", action="store_true", help="build the 7B architecture without weights")
    p.add_argument("--method", default="fastv")
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--method-kwargs", default="{}", help='JSON, e.g. \'{"layer": 3}\'')
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size (Qwen2-VL: 336 420 gives the paper's 180 tokens per temporal patch)")
    p.add_argument("--attn", default="sdpa", choices=sharp.backbones.ATTN_IMPLEMENTATIONS)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the backbone's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable timings on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bb = sharp.load_backbone(args.backbone, attn_implementation=args.attn,
                             random_weights=True if args.random_weights else None,
                             dtype=getattr(torch, args.dtype) if args.dtype else None)
    inputs = bb.synthetic_inputs(frames=args.frames, seed=0,
                                 size=tuple(args.size) if args.size else None)
    layout = bb.layout(inputs)
    kwargs = json.loads(args.method_kwargs)
    print(f"backbone {bb.name} ({bb.device}, {bb.dtype}, {args.attn}): {layout.n_visual} visual tokens "
          f"= {layout.frames} x {layout.tokens_per_frame}, sequence {inputs['input_ids'].shape[1]}")

    van_total, van_llm, _, _ = _time_prefill(bb, inputs, args.repeats, args.warmup)
    m_total, m_llm, m_stages, trace = _time_prefill(
        bb, inputs, args.repeats, args.warmup,
        prune_ctx=lambda: sharp.prune(bb, args.method, args.retention, **kwargs))

    tf_van = prefill_tflops(bb, "vanilla", 1.0, visual_tokens=layout.n_visual)
    tf_m = prefill_tflops(bb, args.method, args.retention, visual_tokens=layout.n_visual, **kwargs)
    # selection overhead = the engine-timed stage (scoring + method selection) + custom masks
    select_ms = m_stages.get("select", 0.0) + m_stages.get("mask", 0.0)
    kept = trace.visual_tokens_per_layer[-1]
    rows = {
        "backbone": bb.name, "method": args.method, "retention": args.retention, "n_visual": layout.n_visual,
        "kept_last_layer": kept, "vanilla_total_ms": van_total, "vanilla_llm_ms": van_llm,
        "method_total_ms": m_total, "method_llm_ms": m_llm, "selection_ms": select_ms, "stage_ms": m_stages,
        "tflops_vanilla": tf_van, "tflops_method": tf_m, "flops_ratio": tf_van / tf_m,
        "speedup_llm": van_llm / m_llm, "speedup_total": van_total / m_total,
        "selection_share_of_vanilla_llm": select_ms / van_llm,
    }
    print(f"{'':24s}{'TFLOPs':>10s}{'LLM ms':>10s}{'total ms':>10s}")
    print(f"{'vanilla':24s}{tf_van:10.3f}{van_llm:10.1f}{van_total:10.1f}")
    print(f"{args.method + f' r={args.retention}':24s}{tf_m:10.3f}{m_llm:10.1f}{m_total:10.1f}")
    method_steps = {k: v for k, v in m_stages.items() if k not in ENGINE_KEYS}
    print(f"selection overhead {select_ms:.1f} ms = stage {m_stages.get('select', 0.0):.1f} + custom masks "
          f"{m_stages.get('mask', 0.0):.1f}" + ("; of which the method's steps: "
          + ", ".join(f"{k} {v:.1f}" for k, v in method_steps.items()) if method_steps else ""))
    print(f"engine-timed prefill {m_stages.get('prefill', 0.0):.1f} ms = vision tower + embedding "
          f"{m_stages.get('prefill', 0.0) - m_stages.get('llm', 0.0):.1f} + LLM {m_stages.get('llm', 0.0):.1f} "
          f"(LLM forward without the selection: {m_stages.get('forward', 0.0):.1f})")
    print(f"visual tokens after pruning: {kept} of {layout.n_visual} "
          f"({100 * tf_m / tf_van:.1f}% of vanilla TFLOPs)")
    print(f"speedup (LLM prefill): {rows['speedup_llm']:.2f}x   FLOPs ratio: {rows['flops_ratio']:.2f}x   "
          f"selection = {100 * rows['selection_share_of_vanilla_llm']:.1f}% of vanilla LLM prefill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
