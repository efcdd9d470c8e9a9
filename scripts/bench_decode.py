"""Decode time per token and KV-cache bytes of vanilla vs SharpV with and without its memory stage,
or vs DyCoke with and without its decode-time KV selection.

    python scripts/bench_decode.py --threads 1                     # mid-size LLaVA-OV, M = 0 / 0.2 / 1
    python scripts/bench_decode.py --thresholds 0 0.2 --method-kwargs '{"mode": "fixed"}' --retention 0.25
    python scripts/bench_decode.py --method dycoke --threads 1     # DyCoke (K 0.7, P 0.8) and P = 0 (TTM only)
    python scripts/bench_decode.py --backbone llava_onevision_7b --random-weights --attn flash_attention_2

``bench_prefill.py`` times the prefill only; Memory SharpV acts after it (it drops the visual
KV-cache entries of the decoder layers whose visual hidden states degraded, sim_l < M), so its
effect is on decoding: each configuration runs ``generate`` with exactly ``--new-tokens`` greedy
tokens on one synthetic input, and a hook on the model times every forward call: the first is the
prefill, the others are decode steps. ``--warmup`` untimed rounds, then ``--repeats`` timed ones;
each round runs every configuration once (interleaved, so that a changing load on a shared machine
hits all of them alike).

Reported per configuration: median prefill ms; decode ms per token (median over the timed rounds of
the mean decode-step time; every round's value is in the JSON); KV-cache bytes after the prefill (the cache the decode steps read:
vanilla's full cache, SharpV's after its visual stage and, when on, its memory drop) and at the end
of generation (``out.past_key_values``); the layers whose visual entries were dropped and the
per-layer similarity sim_l from the trace (SharpV); the decode steps that re-selected and the visual
entries a decode step's query saw on average from layer L on (DyCoke: its cache keeps every entry); the peak memory one generate added (``peak_mib``: CPU peak
RSS, GPU ``torch.cuda.max_memory_allocated``, ``sharp.engine.memory``). Rows: vanilla, then ``sharpv`` with
``memory_threshold`` = each of ``--thresholds`` (0 = no memory stage: the visual stage alone); with
``--method dycoke``: ``dycoke`` (its defaults and ``--method-kwargs``; ``--retention`` default 0.494 = the
official K = 0.7 on 32 x 196) and ``dycoke P=0`` (the same TTM, no decode-time selection).
Writes the Markdown table to stdout and, with ``--json FILE``, the figures to FILE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp
from sharp.engine import compat
from sharp.engine.memory import peak_memory


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    """Bytes of the keys and values of every layer of a transformers Cache."""
    return sum(int(t.numel() * t.element_size()) for layer in cache.layers for t in (layer.keys, layer.values))


def cache_entries(cache) -> list[int]:
    """Cached entries (sequence length) of every layer (sample 0)."""
    return [int(layer.keys.shape[2]) for layer in cache.layers]


def timed_generate(bb, inputs, new_tokens: int):
    """One greedy generate of exactly ``new_tokens`` tokens; (output, per-call seconds)."""
    calls, marks = [], {}

    def pre(module, args, kwargs):
        _sync(bb.device)
        marks["t0"] = time.perf_counter()

    def post(module, args, kwargs, out):
        _sync(bb.device)
        calls.append(time.perf_counter() - marks["t0"])

    h1 = bb.model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = bb.model.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            out = bb.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    return_dict_in_generate=True)
    finally:
        h1.remove()
        h2.remove()
    return out, calls


def run_once(bb, inputs, new_tokens: int, prune=None) -> dict:
    """One timed generate of one configuration: prefill ms, mean decode ms per step, cache figures."""
    ctx = prune() if prune else None
    trace = ctx.__enter__() if ctx else None
    try:
        with peak_memory(bb.device) as peak:
            out, calls = timed_generate(bb, inputs, new_tokens)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    row = {"prefill_ms": calls[0] * 1e3, "decode_ms_per_token": statistics.fmean(calls[1:]) * 1e3,
           "kv_bytes_end": cache_bytes(compat.output_cache(out)), "kv_entries_end": cache_entries(compat.output_cache(out)),
           "peak_mib": peak.mib, "peak_kind": peak.kind}
    # after the prefill each layer holds its prompt entries; every decode step adds one per layer
    per_entry = row["kv_bytes_end"] // max(1, sum(row["kv_entries_end"]))  # bytes of one entry, whole batch
    row["kv_bytes_after_prefill"] = row["kv_bytes_end"] - (new_tokens - 1) * len(row["kv_entries_end"]) * per_entry
    if trace is not None and "dycoke" in trace.methods:
        m = trace.method("dycoke")
        row["visual_tokens_kept"] = trace.visual_tokens_per_layer[0]
        row["reselected_steps"] = sum(any(step) for step in getattr(m, "reselected", []))
        seen = [len(kept[0]) if kept is not None else row["visual_tokens_kept"]
                for step in trace.decode_steps for _, _, kept in step]
        row["visual_seen_per_step"] = statistics.fmean(seen) if seen else row["visual_tokens_kept"]
    elif trace is not None:
        m = trace.method("sharpv")
        row["visual_tokens_kept"] = trace.visual_tokens_per_layer[0]
        row["dropped_layers"] = getattr(m, "dropped_layers", [])
        row["kv_bytes_saved"] = getattr(m, "kv_bytes_saved", 0)
        sims = getattr(m, "similarity", None)
        row["similarity"] = [round(float(row[0]), 4) for row in sims] if sims is not None else None
    return row


def measure(bb, inputs, configs: dict, new_tokens: int, repeats: int, warmup: int) -> list[dict]:
    """Every configuration (name -> prune factory or None), the runs INTERLEAVED (run i of every
    configuration, then run i + 1), so that a changing machine load hits all of them alike; medians."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for i in range(warmup + repeats):
        for name, prune in configs.items():
            row = run_once(bb, inputs, new_tokens, prune)
            if i >= warmup:
                runs[name].append(row)
    rows = []
    for name, got in runs.items():
        row = dict(got[-1], config=name)
        for key in ("prefill_ms", "decode_ms_per_token"):
            row[key] = statistics.median(r[key] for r in got)
            row[key + "_runs"] = [round(r[key], 2) for r in got]
        peaks = [r["peak_mib"] for r in got if r["peak_mib"] is not None]
        row["peak_mib"] = max(peaks) if peaks else None  # the most memory one generate added
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mid_llava_onevision")
    p.add_argument("--random-weights", action="store_true", help="build the 7B architecture without weights")
    p.add_argument("--method", default="sharpv", choices=["sharpv", "dycoke"])
    p.add_argument("--retention", type=float, default=None,
                   help="SharpV's retention (fixed mode only; default 0.12) or DyCoke's (default 0.494)")
    p.add_argument("--method-kwargs", default="{}", help='JSON kwargs of the method, e.g. \'{"mode": "fixed"}\'')
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.2, 1.0],
                   help="memory_threshold of each SharpV row (0 = no memory stage)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--attn", default="sdpa", choices=sharp.backbones.ATTN_IMPLEMENTATIONS)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the backbone's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: stable timings)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (one prefill + at least one decode step), got {args.new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = json.loads(args.method_kwargs)
    if args.retention is None:
        args.retention = 0.12 if args.method == "sharpv" else 0.494
    if "memory_threshold" in kwargs:
        p.error("set memory_threshold with --thresholds, not in --method-kwargs")
    try:  # bad kwargs: one error line before any model is built
        sharp.make_method(args.method, args.retention, **kwargs)
    except (TypeError, ValueError) as err:
        p.error(str(err))

    bb = sharp.load_backbone(args.backbone, attn_implementation=args.attn,
                             random_weights=True if args.random_weights else None,
                             dtype=getattr(torch, args.dtype) if args.dtype else None)
    inputs = bb.synthetic_inputs(frames=args.frames, seed=0)
    layout = bb.layout(inputs)
    print(f"backbone {bb.name} ({bb.device}, {bb.dtype}, {args.attn}): {layout.n_visual} visual tokens, "
          f"sequence {inputs['input_ids'].shape[1]}, {args.new_tokens} new tokens, {bb.num_layers} layers")
    configs = {"vanilla": None}
    if args.method == "dycoke":
        configs["dycoke"] = lambda: sharp.prune(bb, "dycoke", args.retention, **kwargs)
        configs["dycoke P=0"] = lambda: sharp.prune(bb, "dycoke", args.retention, **{**kwargs, "kv_prune_ratio": 0.0})
    for m_value in args.thresholds if args.method == "sharpv" else []:
        configs[f"sharpv M={m_value:g}"] = (lambda m_value=m_value: sharp.prune(
            bb, "sharpv", args.retention, memory_threshold=m_value, **kwargs))
    rows = measure(bb, inputs, configs, args.new_tokens, args.repeats, args.warmup)

    van = rows[0]
    print("\n| config | visual kept | prefill ms | decode ms/token | KV MiB after prefill | KV MiB at end "
          "| KV vs vanilla | dropped layers | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        kept = r.get("visual_tokens_kept", layout.n_visual)
        dropped = r.get("dropped_layers", [])
        print(f"| {r['config']} | {kept} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
              f"{r['kv_bytes_after_prefill'] / 2**20:.2f} | {r['kv_bytes_end'] / 2**20:.2f} | "
              f"{100 * r['kv_bytes_after_prefill'] / van['kv_bytes_after_prefill']:.1f}% | "
              f"{len(dropped)} of {bb.num_layers}" + (f" ({dropped[0]}..{dropped[-1]})" if dropped else "") + " | "
              + ("—" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}") + " |")
    for r in rows:
        if "reselected_steps" in r:
            print(f"\n{r['config']}: {r['reselected_steps']} of {args.new_tokens - 1} decode steps re-selected; "
                  f"a step's query saw {r['visual_seen_per_step']:.1f} of {r['visual_tokens_kept']} visual entries "
                  f"from layer L on, on average")
    sims = next((r["similarity"] for r in rows if r.get("similarity")), None)
    if sims:
        print("\nsim_l (layer input vs layer 0, sample 0): " + " ".join(f"{s:.3f}" for s in sims))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": vars(args) | {"n_visual": layout.n_visual, "num_layers": bb.num_layers},
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
