"""Prefill latency of vanilla vs pruning methods, beside their FLOPs ratios (Table 4 style).

    python scripts/bench_prefill.py --threads 1                                  # FastV 25%, mid-size LLaVA-OV
    python scripts/bench_prefill.py --threads 1 --methods fastv pdrop feather framefusion sharp
    python scripts/bench_prefill.py --methods fastv pdrop sharp --kwargs pdrop.layers=[2,9,14] \\
        pdrop.retention=0.5 sharp.match_flops=fastv
    python scripts/bench_prefill.py --method sharp --retention 0.2 --method-kwargs '{"match_flops": "fastv"}'

CPU default: the mid-size random-weight LLaVA-OV config (16 layers, 1568 visual tokens, seconds per
prefill). GPU, paper size: ``--backbone llava_onevision_7b --random-weights --frames 32``.

Timing protocol (the same for vanilla and every method, in one process on one input): per method,
``--warmup`` prefill forwards that are not counted, then ``--repeats`` timed ones; the median of
the repeats is reported. Vanilla is timed first, without ``sharp.prune`` (no engine hooks), then the
methods in the order given. Times: the whole prefill forward (vision tower included) and the
language-model part alone (hooks on the LLM's forward: first entry to last exit, so a method's
probe pass through the LLM counts inside it); the method's selection overhead is the
engine-timed ``select`` + ``mask`` stages of ``trace.stage_times`` (its own steps are broken down
in the JSON and the single-method printout). Speedup = vanilla ms / method ms; FLOPs ratio = vanilla
/ method prefill TFLOPs of ``sharp.flops.prefill_tflops`` (paper convention, the method's token
schedule; ``flops_ratio_trace`` in the files uses the measured ``trace.visual_tokens_per_layer``);
selection % = selection ms / the method's own LLM prefill ms.

Clock (``--clock``, default ``auto``): on a CPU with ``--threads 1`` the main thread's CPU time
(``time.thread_time``: every prefill FLOP runs in that thread and the time a shared machine gives to
other processes does not count), else wall-clock with CUDA synchronisation. The engine's stage timers
(selection) then read the same clock: the bench sets it as the session's ``Trace.clock``.
speed/FLOPs = speedup (LLM) / FLOPs ratio (the trace's for methods whose schedule depends on the
video: SharpV adaptive, FrameFusion, HoliTom). The paper's FLOPs convention counts visual tokens only
(4nd^2 + 2n^2d + 2ndm per layer); ``flops_ratio_sequence`` counts what the LLM really computes (text
rows too, SwiGLU, GQA, causal attention: ``sharp.flops`` "exact") on the measured schedule, so
speed / sequence FLOPs is the implementation's efficiency (1.0 = time exactly proportional to FLOPs).
Peak memory (``peak_mib``): the most memory one prefill added (CPU: peak RSS through
``/proc/self/clear_refs``; GPU: ``torch.cuda.max_memory_allocated``; ``sharp.engine.memory``).

Methods and their settings:

* ``--method NAME`` (one method, the default ``fastv``) or ``--methods A B ...`` (one table, one
  run). Names are ``sharp.method_names()`` or ``+``-joined compositions; anything else is one error
  line listing the registered methods.
* ``--retention R`` is every method's retention (default 0.25).
* ``--kwargs METHOD.KEY=VALUE ...`` sets one kwarg of one method (VALUE is JSON, else a string:
  ``pdrop.layers=[2,8,12]``, ``sharp.match_flops=fastv``, ``fastv+sharp.sharp.layer=2`` for a
  composed child). The key ``retention`` sets that method's retention (``pdrop.retention=0.5``).
* ``--method-kwargs JSON``: with ``--method``, that method's kwargs (``'{"layer": 3}'``); with
  ``--methods``, kwargs keyed by method (``'{"pdrop": {"layers": [2, 8, 12]}}'``). ``--kwargs``
  applies on top.
* Every method is resolved for the backbone by ``sharp.resolve_method``, as ``run.py`` resolves it:
  unset layers follow the backbone's depth (16 layers: PyramidDrop before 2, 9, 14; HoliTom's
  in-LLM stage before 10), positions are automatic (compact where the official code compacts, on
  1-D RoPE only), the method config's per-backbone values apply; given kwargs win. The table's
  kwargs column shows the given kwargs and the resolved changes.

Outputs: the Markdown table on stdout, and ``bench_prefill.md`` / ``.csv`` / ``.json`` in
``results/bench_prefill/<backbone>/`` (or, with ``--json FILE``, FILE and the ``.csv`` / ``.md`` of
the same stem beside it). The JSON holds ``info`` (settings), ``vanilla`` and ``rows`` (one per
method: the keys of the single-method JSON of earlier versions plus the selection shares).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import sharp  # noqa: E402
from sharp.engine.memory import peak_memory  # noqa: E402
from sharp.flops import lm_dims, prefill_tflops, schedule_tflops  # noqa: E402

# the engine's own trace.stage_times keys; every other key is a method's step inside select / mask
ENGINE_KEYS = ("prefill", "llm", "forward", "select", "mask")

CSV_FIELDS = ["method", "retention", "kwargs", "n_visual", "kept_last_layer", "tflops", "flops_ratio",
              "flops_ratio_trace", "llm_ms", "total_ms", "speedup_llm", "speedup_total", "selection_ms",
              "selection_pct_of_llm", "selection_pct_of_vanilla_llm", "method_steps_ms", "speed_per_flops",
              "speed_per_flops_trace", "flops_ratio_sequence", "speed_per_flops_sequence", "peak_mib"]


class BenchError(ValueError):
    """A bad argument: printed as one ``error:`` line, exit status 2."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"name": "wall", "fn": time.perf_counter}


def set_clock(name: str, device, threads: int) -> str:
    """``wall`` (perf_counter), ``cpu`` (the main thread's CPU time: with one torch thread on a CPU every
    prefill FLOP runs in that thread, and time the OS gives other processes does not count, so a
    shared machine's load hardly moves it) or ``auto`` (cpu on a CPU device with 1 thread, else wall)."""
    if name == "auto":
        name = "cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"
    if name == "cpu" and torch.device(device).type != "cpu":
        raise BenchError("--clock cpu measures CPU work; on a GPU use --clock wall")
    CLOCK.update(name=name, fn=time.thread_time if name == "cpu" else time.perf_counter)
    return name


def _time_prefill(bb, inputs, repeats, warmup, prune_ctx=None, peaks=None):
    """Median (total_ms, llm_ms, stage_ms, last trace) of prefill forwards; ``peaks`` (a list, if
    given) receives every timed forward's peak memory in MiB above its start (sharp.engine.memory)."""
    lm = bb.language_model
    marks = {}
    clock = CLOCK["fn"]

    # first entry to last exit of the LLM in one forward: a method's probe (ShaRP's PosC pass) re-enters
    # the LLM inside a stage (and may leave it early), which must not restart the clock
    def pre(module, args, kwargs):
        if "lm0" not in marks:
            _sync(bb.device)
            marks["lm0"] = clock()

    def post(module, args, kwargs, out):
        _sync(bb.device)
        marks["lm1"] = clock()

    h1 = lm.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = lm.register_forward_hook(post, with_kwargs=True)
    totals, llms, stages = [], [], []
    trace = None
    try:
        for i in range(warmup + repeats):
            marks.clear()
            ctx = prune_ctx() if prune_ctx else None
            trace = ctx.__enter__() if ctx else None
            if trace is not None:
                trace.clock = clock  # the engine's and methods' stage timers read the bench clock
            try:
                with peak_memory(bb.device) as peak:
                    _sync(bb.device)
                    t0 = clock()
                    with torch.no_grad():
                        bb.model(**inputs, use_cache=True)
                    _sync(bb.device)
                    t1 = clock()
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
            if i >= warmup:
                totals.append((t1 - t0) * 1e3)
                llms.append((marks["lm1"] - marks["lm0"]) * 1e3)
                stages.append(dict(trace.stage_times) if trace else {})
                if peaks is not None and peak.mib is not None:
                    peaks.append(peak.mib)
    finally:
        h1.remove()
        h2.remove()
    med_stage = {k: statistics.median(s.get(k, 0.0) for s in stages) * 1e3 for k in (stages[0] if stages else {})}
    return statistics.median(totals), statistics.median(llms), med_stage, trace


# ----------------------------------------------------------------------------- settings
def parse_value(text: str):
    """JSON if it parses (numbers, lists, true/false/null), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_kwarg(item: str, methods: list[str]) -> tuple[str, list[str], object]:
    """``METHOD.KEY=VALUE`` (KEY may be dotted for a composed child) -> (method, key path, value)."""
    target, sep, value = item.partition("=")
    method, dot, key = target.partition(".")
    if not sep or not dot or not key or not method:
        raise BenchError(f"--kwargs {item!r}: accepted form METHOD.KEY=VALUE, e.g. pdrop.layers=[2,8,12]")
    if method not in methods:
        raise BenchError(f"--kwargs {item!r}: method {method!r} is not benchmarked; accepted methods: "
                         f"{', '.join(methods)}")
    return method, key.split("."), parse_value(value)


def check_names(methods: list[str]) -> None:
    """Every name is registered (or a '+'-composition of registered names); else one error line."""
    registered = [m for m in sharp.method_names() if not m.startswith("_")]
    unknown = [m for m in methods if not m or any(p not in registered for p in m.split("+"))]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(map(repr, unknown))}; registered methods: "
                         f"{', '.join(registered)} (or several joined by '+', e.g. fastv+sharp)")
    if len(set(methods)) != len(methods):
        raise BenchError(f"--methods lists a method twice: {methods}; accepted: each method once")


def _set(d: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise BenchError(f"--kwargs: {'.'.join(path)} sets a key inside a non-dict value")
    d[path[-1]] = value


def method_settings(args, methods: list[str], bb, n_visual: int) -> list[dict]:
    """(method, retention, kwargs, the resolved method and its changes) of every benchmarked method,
    resolved for the backbone (``sharp.resolve_method``: a bad kwarg or a layer outside the model fails
    here, before any timing)."""
    try:
        given = json.loads(args.method_kwargs) if args.method_kwargs else {}
    except json.JSONDecodeError as err:
        raise BenchError(f"--method-kwargs {args.method_kwargs!r} is not JSON ({err}); accepted values: a JSON "
                         "object") from None
    if not isinstance(given, dict):
        raise BenchError(f"--method-kwargs {args.method_kwargs!r}: accepted values: a JSON object")
    if args.methods is None:
        given = {methods[0]: given}
    else:
        bad = [k for k, v in given.items() if k not in methods or not isinstance(v, dict)]
        if bad:
            raise BenchError(f"--method-kwargs with --methods takes {{\"<method>\": {{...}}}} keyed by the listed "
                             f"methods ({', '.join(methods)}); got key(s) {bad}")
    settings = []
    for method in methods:
        kwargs = dict(given.get(method, {}))
        settings.append({"method": method, "retention": args.retention, "kwargs": kwargs})
    by_name = {s["method"]: s for s in settings}
    for item in args.kwargs or []:
        method, path, value = parse_kwarg(item, methods)
        _set(by_name[method]["kwargs"], path, value)
    for s in settings:
        if "retention" in s["kwargs"]:
            s["retention"] = s["kwargs"].pop("retention")
        try:
            resolved = sharp.resolve_method(s["method"], bb, s["retention"], **s["kwargs"])
            s["pruner"], s["settings"] = resolved.method, resolved.changes
        except (TypeError, ValueError) as err:
            raise BenchError(f"{s['method']} (retention {s['retention']}, kwargs {s['kwargs']}) on {bb.name} "
                             f"({bb.num_layers} layers): {err} (set kwargs with --kwargs {s['method']}.KEY=VALUE)") from None
    return settings


# ----------------------------------------------------------------------------- measuring
def bench_method(bb, inputs, n_visual: int, setting: dict, vanilla: dict, repeats: int, warmup: int) -> dict:
    """One row: the method's prefill timings, TFLOPs and selection overhead against ``vanilla``."""
    method, retention, kwargs, pruner = setting["method"], setting["retention"], setting["kwargs"], setting["pruner"]
    peaks = []
    total, llm, stages, trace = _time_prefill(bb, inputs, repeats, warmup, prune_ctx=lambda: sharp.prune(bb, pruner),
                                              peaks=peaks)
    tflops = prefill_tflops(bb, pruner, visual_tokens=n_visual)
    tflops_trace = schedule_tflops(list(trace.visual_tokens_per_layer), lm_dims(bb))
    # what the LLM really computes: text + visual rows of every layer, exact FLOPs (SwiGLU, GQA, causal)
    n_text = vanilla["sequence"] - n_visual
    tflops_seq = schedule_tflops([v + n_text for v in trace.visual_tokens_per_layer], lm_dims(bb), "exact")
    # selection overhead = the engine-timed stage (scoring + method selection) + custom masks
    select_ms = stages.get("select", 0.0) + stages.get("mask", 0.0)
    return {
        "backbone": bb.name, "method": method, "retention": retention, "kwargs": kwargs,
        "settings": setting["settings"], "n_visual": n_visual,
        "kept_last_layer": trace.visual_tokens_per_layer[-1],
        "visual_tokens_per_layer": list(trace.visual_tokens_per_layer),
        "vanilla_total_ms": vanilla["total_ms"], "vanilla_llm_ms": vanilla["llm_ms"],
        "method_total_ms": total, "method_llm_ms": llm, "llm_ms": llm, "total_ms": total,
        "selection_ms": select_ms, "stage_ms": stages,
        "method_steps_ms": {k: v for k, v in stages.items() if k not in ENGINE_KEYS},
        "tflops_vanilla": vanilla["tflops"], "tflops_method": tflops, "tflops": tflops,
        "tflops_trace": tflops_trace, "flops_ratio": vanilla["tflops"] / tflops,
        "flops_ratio_trace": vanilla["tflops"] / tflops_trace,
        "speedup_llm": vanilla["llm_ms"] / llm, "speedup_total": vanilla["total_ms"] / total,
        "selection_pct_of_llm": 100 * select_ms / llm,
        "selection_pct_of_vanilla_llm": 100 * select_ms / vanilla["llm_ms"],
        "selection_share_of_vanilla_llm": select_ms / vanilla["llm_ms"],
        "speed_per_flops": (vanilla["llm_ms"] / llm) / (vanilla["tflops"] / tflops),
        "speed_per_flops_trace": (vanilla["llm_ms"] / llm) / (vanilla["tflops"] / tflops_trace),
        "tflops_sequence": tflops_seq, "flops_ratio_sequence": vanilla["tflops_sequence"] / tflops_seq,
        "speed_per_flops_sequence": (vanilla["llm_ms"] / llm) / (vanilla["tflops_sequence"] / tflops_seq),
        "input_dependent_schedule": bool(getattr(pruner, "input_dependent_schedule", False)),
        "peak_mib": max(peaks) if peaks else None, "peak_mib_repeats": peaks,
    }


# ----------------------------------------------------------------------------- reporting
def _kwargs_text(kwargs: dict, changes: list[str]) -> str:
    """The given kwargs, then what resolving changed from the paper's defaults (layers, positions)."""
    given = [json.dumps(kwargs, separators=(",", ":"))] if kwargs else []
    return "; ".join(given + changes)


def _mib(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def _steps_text(steps: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in steps.items())


def markdown_table(rows: list[dict], vanilla: dict, info: dict) -> str:
    caption = (f"Prefill on `{info['backbone']}` ({info['device']}, {info['dtype']}, {info['attn']}, "
               f"{info['threads']} threads, {info.get('clock', 'wall')} clock): {info['n_visual']} visual tokens = {info['frames']} x "
               f"{info['tokens_per_frame']}, sequence {info['sequence']}; median of {info['repeats']} after "
               f"{info['warmup']} warm-up. Speedup = vanilla / method ms; FLOPs ratio = vanilla / method TFLOPs "
               "(`sharp.flops.prefill_tflops`; trace: of the measured visual tokens per layer); "
               "selection = engine-timed select + mask, % of the method's LLM prefill; kept = visual tokens of "
               "the last layer. speed/FLOPs = speedup (LLM) / FLOPs ratio (for an input-dependent schedule, "
               "marked *, the trace's); seq. FLOPs ratio = exact FLOPs (SwiGLU, GQA, causal) of every row the "
               "LLM computes, text included, measured schedule; peak MiB = "
               f"{info.get('peak_kind') or 'peak memory'} of one prefill.")
    header = ("| method | retention | kwargs | kept | TFLOPs | LLM prefill ms | total ms | speedup (LLM) "
              "| speedup (total) | FLOPs ratio | FLOPs ratio (trace) | speed/FLOPs | seq. FLOPs ratio | speed/seq. FLOPs "
              "| selection ms | selection % | peak MiB | method steps (ms) |")
    vanilla_row = (f"| vanilla | 1 | | {info['n_visual']} | {vanilla['tflops']:.4g} | {vanilla['llm_ms']:.1f} | "
                   f"{vanilla['total_ms']:.1f} | 1.00x | 1.00x | 1.00x | 1.00x | 1.00 | 1.00x | 1.00 | — | — | "
                   f"{_mib(vanilla.get('peak_mib'))} | |")
    lines = [caption, "", header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             vanilla_row]
    for r in rows:
        dep = r.get("input_dependent_schedule")
        spf = r["speed_per_flops_trace"] if dep else r["speed_per_flops"]
        lines.append(
            f"| {r['method']} | {r['retention']:g} | {_kwargs_text(r['kwargs'], r.get('settings') or [])} | {r['kept_last_layer']} | "
            f"{r['tflops']:.4g} | {r['llm_ms']:.1f} | {r['total_ms']:.1f} | {r['speedup_llm']:.2f}x | "
            f"{r['speedup_total']:.2f}x | {r['flops_ratio']:.2f}x | {r['flops_ratio_trace']:.2f}x | "
            f"{spf:.2f}{'*' if dep else ''} | {r['flops_ratio_sequence']:.2f}x | {r['speed_per_flops_sequence']:.2f} | "
            f"{r['selection_ms']:.1f} | {r['selection_pct_of_llm']:.1f}% | {_mib(r.get('peak_mib'))} | "
            f"{_steps_text(r['method_steps_ms'])} |")
    return "\n".join(lines) + "\n"


def output_paths(args, backbone: str) -> dict[str, Path]:
    json_path = Path(args.json) if args.json else REPO / "results" / "bench_prefill" / backbone / "bench_prefill.json"
    return {"json": json_path, "csv": json_path.with_suffix(".csv"), "md": json_path.with_suffix(".md")}


def _csv_value(row: dict, key: str):
    value = row.get(key, "")
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return f"{value:.6g}" if isinstance(value, float) else value


def write_outputs(paths: dict[str, Path], rows: list[dict], vanilla: dict, info: dict, table: str) -> None:
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps({"info": info, "vanilla": vanilla, "rows": rows}, indent=1) + "\n")
    van_row = {"method": "vanilla", "retention": 1.0, "kwargs": {}, "n_visual": info["n_visual"],
               "kept_last_layer": info["n_visual"], "tflops": vanilla["tflops"], "flops_ratio": 1.0,
               "flops_ratio_trace": 1.0, "llm_ms": vanilla["llm_ms"], "total_ms": vanilla["total_ms"],
               "speedup_llm": 1.0, "speedup_total": 1.0}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in [van_row, *rows]:
            w.writerow({k: _csv_value(r, k) for k in CSV_FIELDS})
    paths["md"].write_text(f"# bench_prefill: {info['backbone']}\n\n{table}")


def print_details(row: dict) -> None:
    """The single-method breakdown (selection steps, engine-timed prefill) of earlier versions."""
    stages = row["stage_ms"]
    steps = row["method_steps_ms"]
    print(f"selection overhead {row['selection_ms']:.1f} ms = stage {stages.get('select', 0.0):.1f} + custom masks "
          f"{stages.get('mask', 0.0):.1f}" + ("; of which the method's steps: " + _steps_text(steps) if steps else ""))
    print(f"engine-timed prefill {stages.get('prefill', 0.0):.1f} ms = vision tower + embedding "
          f"{stages.get('prefill', 0.0) - stages.get('llm', 0.0):.1f} + LLM {stages.get('llm', 0.0):.1f} "
          f"(LLM forward without the selection: {stages.get('forward', 0.0):.1f})")
    print(f"visual tokens after pruning: {row['kept_last_layer']} of {row['n_visual']} "
          f"({100 * row['tflops'] / row['tflops_vanilla']:.1f}% of vanilla TFLOPs)")
    print(f"speedup (LLM prefill): {row['speedup_llm']:.2f}x   FLOPs ratio: {row['flops_ratio']:.2f}x   "
          f"selection = {row['selection_pct_of_vanilla_llm']:.1f}% of vanilla LLM prefill")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mid_llava_onevision")
    p.add_argument("--random-weights", action="store_true", help="build the 7B architecture without weights")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--method", default=None, help="one method (default: fastv)")
    which.add_argument("--methods", nargs="+", default=None, help="several methods, one table")
    p.add_argument("--retention", type=float, default=0.25, help="every method's retention (per method: "
                   "--kwargs METHOD.retention=R)")
    p.add_argument("--method-kwargs", default="{}", help='JSON: with --method its kwargs (\'{"layer": 3}\'); '
                   'with --methods keyed by method (\'{"pdrop": {"layers": [2, 8, 12]}}\')')
    p.add_argument("--kwargs", nargs="+", action="extend", default=None, metavar="METHOD.KEY=VALUE",
                   help="one kwarg of one method, VALUE in JSON (pdrop.layers=[2,8,12] sharp.match_flops=fastv)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size (Qwen2-VL: 336 420 gives the paper's 180 tokens per temporal patch)")
    p.add_argument("--attn", default="sdpa", choices=sharp.backbones.ATTN_IMPLEMENTATIONS)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the backbone's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="write the JSON here (and the .csv / .md beside it); default "
                   "results/bench_prefill/<backbone>/bench_prefill.json")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="auto: the main thread's CPU time on a CPU device with --threads 1 (robust on a shared "
                   "machine), else wall-clock")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable timings on a shared machine)")
    return p


def run(args, backbone=None) -> dict:
    """The benchmark; ``backbone``: an already built Backbone to use instead of loading ``--backbone``
    (scripts/gpu_check.py builds the 7B models directly on the GPU)."""
    methods = args.methods if args.methods is not None else [args.method or "fastv"]
    check_names(methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = backbone if backbone is not None else sharp.load_backbone(
        args.backbone, attn_implementation=args.attn, random_weights=True if args.random_weights else None,
        dtype=getattr(torch, args.dtype) if args.dtype else None)
    inputs = bb.synthetic_inputs(frames=args.frames, seed=0, size=tuple(args.size) if args.size else None)
    layout = bb.layout(inputs)
    n_visual = layout.n_visual
    settings = method_settings(args, methods, bb, n_visual)
    info = {"backbone": bb.name, "device": str(bb.device), "dtype": str(bb.dtype).replace("torch.", ""),
            "attn": args.attn, "threads": torch.get_num_threads(), "n_visual": n_visual, "frames": layout.frames,
            "tokens_per_frame": layout.tokens_per_frame, "sequence": int(inputs["input_ids"].shape[1]),
            "num_layers": bb.num_layers, "repeats": args.repeats, "warmup": args.warmup,
            "torch": torch.__version__}
    info["clock"] = set_clock(args.clock, bb.device, torch.get_num_threads())
    print(f"backbone {bb.name} ({bb.device}, {bb.dtype}, {args.attn}): {n_visual} visual tokens "
          f"= {layout.frames} x {layout.tokens_per_frame}, sequence {info['sequence']}", flush=True)

    van_peaks = []
    van_total, van_llm, _, _ = _time_prefill(bb, inputs, args.repeats, args.warmup, peaks=van_peaks)
    vanilla = {"total_ms": van_total, "llm_ms": van_llm,
               "tflops": prefill_tflops(bb, "vanilla", 1.0, visual_tokens=n_visual),
               "sequence": info["sequence"],
               "tflops_sequence": schedule_tflops([info["sequence"]] * bb.num_layers, lm_dims(bb), "exact"),
               "peak_mib": max(van_peaks) if van_peaks else None}
    with peak_memory(bb.device) as probe_peak:
        pass
    info["peak_kind"] = probe_peak.kind or None
    print(f"vanilla: LLM prefill {van_llm:.1f} ms, total {van_total:.1f} ms", flush=True)
    rows = []
    for s in settings:
        row = bench_method(bb, inputs, n_visual, s, vanilla, args.repeats, args.warmup)
        rows.append(row)
        print(f"{s['method']} r={s['retention']:g}: LLM prefill {row['llm_ms']:.1f} ms "
              f"({row['speedup_llm']:.2f}x, FLOPs {row['flops_ratio']:.2f}x, trace {row['flops_ratio_trace']:.2f}x, "
              f"sequence {row['flops_ratio_sequence']:.2f}x), selection {row['selection_ms']:.1f} ms, "
              f"peak {_mib(row['peak_mib'])} MiB",
              flush=True)
    table = markdown_table(rows, vanilla, info)
    print()
    print(table)
    if len(rows) == 1:
        print_details(rows[0])
    paths = output_paths(args, bb.name)
    write_outputs(paths, rows, vanilla, info, table)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return {"info": info, "vanilla": vanilla, "rows": rows, "paths": {k: str(v) for k, v in paths.items()}}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
