#!/usr/bin/env python
"""Accuracy of every registered pruning method against retention (and prefill TFLOPs).

    python scripts/retention_curve.py --backbone toy_llava_onevision
    python scripts/retention_curve.py --backbone toy_qwen2_vl --methods fastv sharp --n 100

Evaluates vanilla (retention 1.0) and every method of ``sharp.methods.method_names()`` (names
starting with ``_`` skipped; new methods are picked up automatically) at the given retentions on
the synthetic test split, by greedy generation of the answer letter through ``sharp.prune``
(``sharp.toy.evaluate``: the backbone's own frame sampling and preprocessing, the lmms-eval task's
prompt and answer parser). Writes into ``results/retention_curve/<backbone>/`` (or ``--out``):

* ``retention_curve.md``  accuracy table (methods x retentions), TFLOPs, per-question-type table;
* ``retention_curve.csv`` one row per (method, retention);
* ``retention_curve.json`` the same plus settings;
* ``retention_curve.png`` accuracy vs retention and vs prefill TFLOPs
  (``sharp.flops.prefill_tflops(backbone, method, retention, visual_tokens=n_visual)``).

A method that raises is reported in the tables (``error``) and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp  # noqa: E402
from sharp import toy  # noqa: E402

RETENTIONS = (0.5, 0.25, 0.1, 0.05)
# Every method runs with its defaults resolved for the backbone (sharp.resolve_method: the paper's
# 28-layer layers mapped to the toy's depth, automatic positions), exactly as `python run.py` runs it;
# the settings that differ from the paper's are written next to each row.


def _tflops(bb, method, res) -> float:
    """Prefill TFLOPs of the (resolved) method's token schedule, or, when its kept counts depend on the
    video (FrameFusion, adaptive SharpV), the mean over the videos of their measured schedules."""
    if method.input_dependent_schedule:
        dims = sharp.flops.lm_dims(bb)
        return float(np.mean([sharp.flops.schedule_tflops(c, dims) for c in res.layer_counts]))
    return sharp.flops.prefill_tflops(bb, method, visual_tokens=res.n_visual)


def _layer_share(res) -> float:
    """Mean share of the visual tokens over the decoder layers and the videos (FrameFusion's budget)."""
    return float(np.mean([np.mean(c) / res.n_visual for c in res.layer_counts])) if res.layer_counts else 1.0


def run(backbone: str, methods, retentions, n: int, split: str, batch_size: int, cache_dir=None,
        data_seed: int = 0, weights_dir=None, log=print, method_kwargs=None, match_flops=None) -> tuple[list[dict], dict]:
    """``method_kwargs``: {method: kwargs} set on top of the resolved defaults (e.g. SharpV's fixed mode).
    ``match_flops`` = (target method, target retention): each method runs once, at the retention whose
    prefill TFLOPs (its nominal schedule, paper convention) equal the target's (``retentions`` unused)."""
    from sharp.methods import budget

    bench = toy.toy_benchmark(backbone)  # the scenes toys: sharp.synthetic.scenes; others: the first benchmark
    QTYPES = bench.QTYPES
    bb = sharp.load_backbone(backbone, device="cpu", weights_dir=weights_dir)
    docs = bench.ensure_split(split, n=n, seed=data_seed)
    store = toy.cached_pixels(bb, docs, cache_dir)
    rows = []
    if match_flops is None:
        plan = [("vanilla", 1.0)] + [(m, r) for m in methods for r in retentions]
    else:
        plan = [("vanilla", 1.0)] + [(m, None) for m in methods]  # None: matched once N_vis is known
    n_visual = None
    for method, retention in plan:
        t0 = time.time()
        if retention is None:
            retention = matched_retention(bb, method, *match_flops, method_kwargs, visual_tokens=n_visual)
        row = {"method": method, "retention": retention}
        try:
            resolved = sharp.resolve_method(method, bb, retention, **(method_kwargs or {}).get(method, {}))
            res = toy.evaluate(bb, docs, resolved.method, retention, store=store, batch_size=batch_size)
            n_visual = res.n_visual
            row.update(accuracy=res.accuracy, kept_tokens=res.kept_tokens,
                       budget=budget(res.n_visual, retention), n_visual=res.n_visual,
                       tflops=_tflops(bb, resolved.method, res), settings="; ".join(resolved.changes),
                       layer_share=_layer_share(res),
                       **{f"acc_{q}": res.per_qtype.get(q, float("nan")) for q in QTYPES},
                       seconds=round(time.time() - t0, 1), error="")
        except Exception as err:  # noqa: BLE001 - report and go on with the other methods
            row.update(error=f"{type(err).__name__}: {err}", seconds=round(time.time() - t0, 1))
            traceback.print_exc()
        rows.append(row)
        if row["error"]:
            log(f"{method:>14s} @ {retention:<5g} ERROR {row['error']}")
        else:
            log(f"{method:>14s} @ {retention:<5g} acc {row['accuracy']:5.1f}%  kept {row['kept_tokens']:.0f}/{n_visual}"
                f"  layer share {row['layer_share']:.3f}"
                f"  {row['tflops'] * 1e6:.2f} MFLOPs  ({row['seconds']:.0f} s)")
    info = {"backbone": backbone, "split": split, "n": len(docs), "n_visual": n_visual, "batch_size": batch_size,
            "methods": list(methods), "retentions": list(retentions), "data_seed": data_seed,
            "benchmark": bench.__name__, "qtypes": list(QTYPES),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    return rows, info


def matched_retention(bb, method: str, target: str, target_retention: float, method_kwargs=None,
                      visual_tokens: int | None = None) -> float:
    """The retention of ``method`` whose nominal prefill TFLOPs equal ``target`` at ``target_retention``
    on ``bb`` (:func:`sharp.flops.match_retention`, the paper's Table 1 matching)."""
    if method == target:
        return target_retention
    kwargs = (method_kwargs or {}).get(method, {})
    return sharp.flops.match_retention(bb, method, target, target_retention, visual_tokens=visual_tokens,
                                       target_kwargs=(method_kwargs or {}).get(target, {}), **kwargs)


def write_matched(rows: list[dict], info: dict, out: Path) -> Path:
    """``matched.md`` / ``matched.json``: each method at the TFLOPs of ``info["match_flops"]``."""
    target, r = info["match_flops"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "matched.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    van = rows[0]
    lines = [f"# Matched TFLOPs: {info['backbone']}", "",
             f"Every method at the retention whose prefill TFLOPs (nominal schedule, paper convention) equal "
             f"{target} at {r:g} (`sharp.flops.match_retention`); synthetic `{info['split']}` split, {info['n']} "
             f"docs, {info['n_visual']} visual tokens; vanilla {_fmt_acc(van)}%. MFLOPs: measured schedules "
             f"where a method's counts depend on the video.", "",
             "| method | retention | accuracy | kept | MFLOPs |", "|---|---:|---:|---:|---:|"]
    for row in rows[1:]:
        cells = (["error", "", ""] if row.get("error") else
                 [_fmt_acc(row), f"{row['kept_tokens']:.0f}", f"{row['tflops'] * 1e6:.3f}"])
        lines.append(f"| {row['method']} | {row['retention']:.3f} | " + " | ".join(cells) + " |")
    (out / "matched.md").write_text("\n".join(lines) + "\n")
    return out / "matched.md"


def _fmt_acc(row) -> str:
    return "error" if row.get("error") else f"{row['accuracy']:.1f}"


def write_outputs(rows: list[dict], info: dict, out: Path) -> dict:
    from sharp.synthetic import QTYPES as FIRST_QTYPES

    QTYPES = info.get("qtypes", FIRST_QTYPES)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["method", "retention", "accuracy", "kept_tokens", "layer_share", "budget", "n_visual", "tflops",
              *[f"acc_{q}" for q in QTYPES], "settings", "seconds", "error"]
    with open(out / "retention_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in fields})
    (out / "retention_curve.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")

    rets = info["retentions"]
    van = rows[0]
    lines = [f"# Retention curve: {info['backbone']}", "",
             f"Synthetic `{info['split']}` split, {info['n']} docs, {info['n_visual']} visual tokens per video; "
             f"accuracy (%) of greedy generation through `sharp.prune`; chance = 25%. "
             f"Vanilla (retention 1.0): **{_fmt_acc(van)}%**, {van.get('tflops', float('nan')) * 1e6:.3f} MFLOPs (TFLOPs x 1e6).",
             "", "| method | " + " | ".join(f"{r:g}" for r in rets) + " |",
             "|---|" + "---:|" * len(rets)]
    by = {(r["method"], r["retention"]): r for r in rows}
    for m in info["methods"]:
        lines.append(f"| {m} | " + " | ".join(_fmt_acc(by[m, r]) if (m, r) in by else "" for r in rets) + " |")
    lines += ["", f"Settings on {info['backbone']} that differ from the paper's 7B defaults "
              "(`sharp.resolve_method`, as `python run.py` runs them):", ""]
    for m in info["methods"]:
        settings = next((by[m, r].get("settings") for r in rets if (m, r) in by and by[m, r].get("settings")), "")
        lines.append(f"- {m}: {settings or 'none'}")
    lines += ["", "Prefill MFLOPs (= TFLOPs x 1e6, paper convention) of the video tokens:", "",
              "| method | 1.0 | " + " | ".join(f"{r:g}" for r in rets) + " |", "|---|---:|" + "---:|" * len(rets)]
    for m in info["methods"]:
        cells = [f"{by[m, r]['tflops'] * 1e6:.3f}" if (m, r) in by and not by[m, r].get("error") else ""
                 for r in rets]
        lines.append(f"| {m} | {van.get('tflops', float('nan')) * 1e6:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Per question type (accuracy %, kept visual tokens):", "",
              "| method | retention | kept | " + " | ".join(QTYPES) + " | all |",
              "|---|---:|---:|" + "---:|" * (len(QTYPES) + 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['retention']:g} | | " + " | ".join("" for _ in QTYPES)
                         + f" | error: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['method']} | {r['retention']:g} | {r['kept_tokens']:.0f} | "
                     + " | ".join(f"{r[f'acc_{q}']:.0f}" for q in QTYPES) + f" | {r['accuracy']:.1f} |")
    (out / "retention_curve.md").write_text("\n".join(lines) + "\n")
    plot(rows, info, out / "retention_curve.png")
    return {"md": str(out / "retention_curve.md"), "csv": str(out / "retention_curve.csv"),
            "png": str(out / "retention_curve.png")}


def plot(rows: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    van = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "os^vD<>pXh*"
    for i, m in enumerate(info["methods"]):
        pts = sorted((r for r in rows if r["method"] == m and not r.get("error")), key=lambda r: r["retention"])
        if not pts:
            continue
        if not van.get("error"):
            pts = pts + [van]  # every curve ends at the unpruned model
        kw = dict(marker=markers[i % len(markers)], label=m, linewidth=2 if m == "sharp" else 1.3)
        axes[0].plot([r["retention"] for r in pts], [r["accuracy"] for r in pts], **kw)
        axes[1].plot([r["tflops"] * 1e6 for r in pts], [r["accuracy"] for r in pts], **kw)
    for ax in axes:
        ax.axhline(25, color="gray", linestyle=":", linewidth=1, label="chance")
        if not van.get("error"):
            ax.axhline(van["accuracy"], color="black", linestyle="--", linewidth=1, label="vanilla")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    ticks = sorted(set(info["retentions"]) | {1.0})
    axes[0].set_xticks(ticks)
    axes[0].set_xticklabels([f"{t:g}" for t in ticks])
    axes[0].set_xlabel("retention (kept share of visual tokens)")
    axes[1].set_xlabel("prefill MFLOPs of the video tokens (TFLOPs x 1e6, paper convention)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{info['backbone']}: synthetic {info['split']} split ({info['n']} docs, "
                 f"{info['n_visual']} visual tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy_llava_onevision")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method but vanilla")
    ap.add_argument("--retentions", nargs="*", type=float, default=list(RETENTIONS))
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=None, help="docs of the split (default: the whole split)")
    ap.add_argument("--batch-size", type=int, default=1, help="1 = what the lmms-eval harness runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--weights-dir", default=None, help="toy weights from this folder (e.g. a retrained copy)")
    ap.add_argument("--out", default=None, help="default: results/retention_curve/<backbone>")
    ap.add_argument("--method-kwargs", default="{}", help='JSON {method: kwargs}, e.g. \'{"sharpv": {"mode": "fixed"}}\'')
    ap.add_argument("--merge", action="store_true",
                    help="keep the other methods' rows of the output folder's retention_curve.json (matched.json "
                         "with --match-flops; same split, n and retentions): rerun or add some methods without "
                         "rerunning all")
    ap.add_argument("--match-flops", default=None, metavar="METHOD@R",
                    help="run each method once, at the TFLOPs of METHOD at retention R (e.g. fastv@0.25); "
                         "writes matched.md / matched.json")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in sharp.method_names() if not m.startswith("_") and m != "vanilla"]
    methods = names if args.methods is None else args.methods
    unknown = [m for m in methods if m not in sharp.method_names()]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; registered: {', '.join(sharp.method_names())}")
    from sharp.synthetic import DEFAULT_N

    n = args.n or DEFAULT_N.get(args.split, 200)
    out = Path(args.out) if args.out else REPO / "results" / "retention_curve" / args.backbone
    t0 = time.time()
    try:
        given = json.loads(args.method_kwargs)
    except json.JSONDecodeError as err:
        ap.error(f"--method-kwargs {args.method_kwargs!r} is not JSON ({err}); accepted: {{\"method\": {{...}}}}")
    if not isinstance(given, dict) or any(not isinstance(v, dict) for v in given.values()):
        ap.error(f"--method-kwargs {args.method_kwargs!r}: accepted: a JSON object of method name -> kwargs object")
    match = parse_match_flops(ap, args.match_flops)
    rows, info = run(args.backbone, methods, args.retentions, n, args.split, args.batch_size, args.cache_dir,
                     weights_dir=args.weights_dir, method_kwargs=given, match_flops=match)
    info["method_kwargs"] = given
    if args.weights_dir:
        info["weights_dir"] = str(args.weights_dir)
    info["seconds"] = round(time.time() - t0, 1)
    if match is not None:
        info["match_flops"] = list(match)
        if args.merge:
            rows, info = merged_with_existing(rows, info, out, ap, "matched.json")
        path = write_matched(rows, info, out)
        print(path.read_text())
        print("wrote", path)
        return 1 if any(r.get("error") for r in rows) else 0
    if args.merge:
        rows, info = merged_with_existing(rows, info, out, ap)
    paths = write_outputs(rows, info, out)
    print((out / "retention_curve.md").read_text())
    print("wrote", ", ".join(paths.values()))
    return 1 if any(r.get("error") for r in rows) else 0


def merged_with_existing(rows: list[dict], info: dict, out: Path, ap, name: str = "retention_curve.json"
                         ) -> tuple[list[dict], dict]:
    """``rows`` plus the rows of the methods NOT rerun from ``out/<name>`` (which must be of the same
    backbone, split, n and retentions, and target for ``matched.json``), in the existing order with new
    methods appended."""
    path = out / name
    if not path.exists():
        ap.error(f"--merge: {path} does not exist; run without --merge first")
    old = json.loads(path.read_text())
    for key in ("backbone", "split", "n", "retentions", "match_flops"):
        if old["info"].get(key) != info.get(key):
            ap.error(f"--merge: {path} has {key}={old['info'].get(key)!r}, this run {info.get(key)!r}; accepted: the same")
    rerun = {r["method"] for r in rows if r["method"] != "vanilla"}
    kept = [r for r in old["rows"] if r["method"] not in rerun and r["method"] != "vanilla"]
    vanilla = [r for r in rows if r["method"] == "vanilla"] or [r for r in old["rows"] if r["method"] == "vanilla"]
    new = [r for r in rows if r["method"] != "vanilla"]
    methods = list(dict.fromkeys([*old["info"].get("methods", []), *info.get("methods", [])]))
    seconds = round(old["info"].get("seconds", 0) + info.get("seconds", 0), 1)
    return vanilla + kept + new, {**old["info"], **info, "methods": methods, "seconds": seconds}


def parse_match_flops(ap, value):
    """``METHOD@R`` -> (METHOD, R), or None; anything else is one argparse error (exit 2)."""
    if value is None:
        return None
    method, _, r = value.partition("@")
    try:
        retention = float(r)
    except ValueError:
        retention = -1.0
    if method not in sharp.method_names() or not 0 < retention <= 1:
        ap.error(f"--match-flops {value!r}: accepted METHOD@R with METHOD one of {', '.join(sharp.method_names())} "
                 f"and R in (0, 1], e.g. fastv@0.25")
    return method, retention


if __name__ == "__main__":
    sys.exit(main())
