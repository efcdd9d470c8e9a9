"""The paper's Table 5 (ShaRP's components) in the toy world, for the default and alternative readings.

    python scripts/ablation.py                       # both toys, retentions 0.235 and 0.1, 200 test videos
    python scripts/ablation.py --backbones toy_llava_onevision --n 100 --readings default previous
    python scripts/ablation.py --backbones toy_scenes_qwen2_vl --retentions 0.235 --readings grid

The variants are the cells of ``configs/sweep/table5.yaml`` (original, posc, posc+segm, posc+regd,
segm+regd, sharp); the paper ran them at 23.5% on LLaVA-OV-7B. Each reading (``READINGS``) is a set
of ShaRP kwargs; ``--readings grid`` names the eight readings of SegM's pass x Eq. 4's text keys x
Eq. 5's space (``GRID``). A kwarg only matters where its component is on (SegM's pass and mask with
SegM; RegD's readings with RegD): a variant where a reading changes nothing is run once and that
result is shown under every reading it stands for (``shared`` in the CSV); a reading that only differs
from the default in kwargs that do not matter there is left empty. Accuracy by greedy generation of
the answer letter through ``sharp.prune`` (``sharp.toy.evaluate``). Writes ``ablation.md``,
``ablation.csv`` and ``ablation.json`` to ``results/ablation/`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp  # noqa: E402
from sharp import toy  # noqa: E402

# reading -> (ShaRP kwargs, the component it needs to matter: None = always)
READINGS = {
    "default": ({}, None),
    "previous": ({"score_at": "previous"}, None),  # the old default: layer 0's map ranks
    "prob": ({"posc_space": "prob"}, None),  # rank (and calibrate) post-softmax attention
    "logit": ({"posc_space": "logit"}, None),  # Eq. 2 / 5's pre-softmax a~ (the default)
    "dedup-adjacent": ({"dedup": "adjacent"}, "regd"),  # compare with the adjacent register token
    "cluster-adjacent": ({"cluster": "adjacent"}, "regd"),  # clusters grow by the adjacent token
    "centre-medoid": ({"centre": "medoid"}, "regd"),  # a cluster's centre is its medoid
    "centre-mean": ({"centre": "mean"}, "regd"),  # ... its members' mean
    "regd-video": ({"regd_segments": "video"}, "regd-no-segm"),  # SegM off: RegD over the whole video
}
# the grid of issue 34: SegM's pass x Eq. 4's text keys x Eq. 5's space (every other kwarg at its default)
GRID = {}
for _pass in ("forward", "scoring"):
    for _text in (False, True):
        for _space in ("logit", "prob"):
            GRID[f"{_pass}/{'text' if _text else 'segment'}/{_space}"] = (
                {"segm_pass": _pass, "segm_sees_text": _text, "posc_space": _space}, None)
READINGS.update(GRID)
# the component each kwarg needs to change anything (absent: always)
NEEDS = {"segm_pass": "segm", "segm_sees_text": "segm", "segm_layers": "segm", "dedup": "regd",
         "cluster": "regd", "centre": "regd", "fill": "regd", "absorb": "regd", "regd_segments": "regd-no-segm"}


def table5_variants() -> list[tuple[str, dict]]:
    """(variant, kwargs) of configs/sweep/table5.yaml, the full method last."""
    sweep = yaml.safe_load((REPO / "configs" / "sweep" / "table5.yaml").read_text())
    out = []
    for cell in sweep["cells"]:
        kwargs = dict(cell.get("method_kwargs") or {})
        out.append((cell.get("variant") or "sharp", kwargs))
    return out


def applies(need, kwargs: dict) -> bool:
    on = {k: kwargs.get(k, True) for k in ("posc", "segm", "regd")}
    if need is None:
        return True
    if need == "regd-no-segm":
        return on["regd"] and not on["segm"]
    return on[need]


def effective(extra: dict, kwargs: dict) -> dict:
    """The reading's kwargs that can change the variant ``kwargs`` (the others are dropped)."""
    return {k: v for k, v in extra.items() if applies(NEEDS.get(k), kwargs)}


def run(backbone: str, retentions, readings, n: int, batch_size: int, log=print) -> list[dict]:
    bb = sharp.load_backbone(backbone, device="cpu")
    docs = toy.toy_benchmark(backbone).ensure_split("test", n=n)  # the backbone's own benchmark
    store = toy.cached_pixels(bb, docs)
    rows, done = [], {}
    for retention in retentions:
        for variant, kwargs in table5_variants():
            for reading in readings:
                extra, need = READINGS[reading]
                used = effective(extra, kwargs)
                if not applies(need, kwargs) or (extra and not used and reading not in GRID):
                    continue
                key = (retention, json.dumps(kwargs, sort_keys=True), json.dumps(used, sort_keys=True))
                shared = key in done
                if not shared:
                    t0 = time.time()
                    res = toy.evaluate(bb, docs, "sharp", retention, store=store, batch_size=batch_size,
                                       **kwargs, **used)
                    done[key] = {"accuracy": res.accuracy, "kept_tokens": res.kept_tokens, "n": res.n,
                                 "seconds": round(time.time() - t0, 1)}
                rows.append({"backbone": backbone, "retention": retention, "variant": variant, "reading": reading,
                             **done[key], "shared": shared})
                log(f"{backbone} r={retention:g} {variant:>10s} {reading:>24s}: {done[key]['accuracy']:5.1f}%"
                    + (" (same run)" if shared else ""))
    return rows


def markdown(rows: list[dict], readings) -> str:
    lines = ["# Table 5 in the toy world: ShaRP's components x readings", "",
             "Accuracy (%) on the synthetic test split (chance 25%); empty: the reading does not apply to "
             "that variant. Paper (LLaVA-OV-7B, 23.5%, average of four benchmarks): original 55.8, posc 57.4, "
             "posc+segm 57.6, posc+regd 58.0, segm+regd 57.6, sharp 58.4.", ""]
    variants = [v for v, _ in table5_variants()]
    for (backbone, retention) in dict.fromkeys((r["backbone"], r["retention"]) for r in rows):
        by = {(r["variant"], r["reading"]): r for r in rows if r["backbone"] == backbone and r["retention"] == retention}
        used = [x for x in readings if any((v, x) in by for v in variants)]
        lines += [f"## {backbone}, retention {retention:g}", "",
                  "| variant | " + " | ".join(used) + " |", "|---|" + "---:|" * len(used)]
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(f"{by[v, x]['accuracy']:.1f}" if (v, x) in by else ""
                                                  for x in used) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="*", default=["toy_llava_onevision", "toy_qwen2_vl"])
    p.add_argument("--retentions", nargs="*", type=float, default=[0.235, 0.1])
    p.add_argument("--readings", nargs="*", default=[r for r in READINGS if r not in GRID],
                   choices=list(READINGS) + ["grid"], help="'grid': the eight readings of GRID")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "results" / "ablation"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.readings = [r for x in args.readings for r in (GRID if x == "grid" else [x])]
    rows = []
    for backbone in args.backbones:
        rows += run(backbone, args.retentions, args.readings, args.n, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "ablation.json").write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows},
                                                  indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(rows, args.readings) + "\n")
    print(f"wrote {out}/ablation.md")


if __name__ == "__main__":
    main()
