#!/usr/bin/env python
"""Fig. 5: the visual tokens each method keeps, on the sampled frames of one video.

    python scripts/show_selection.py --backbone toy_llava_onevision --doc synth-test-s0-00044 \\
        --methods fastv feather sharp --retention 0.25 --out docs/figures/selection.png
    python scripts/show_selection.py --backbone toy_llava_onevision --doc synth-test-s0-00044 --methods sharp --ablation
    python scripts/show_selection.py --backbone llava_onevision_7b --video clip.mp4 --question "What happens?"

One row per method (any registered name, registered combination or ``a+b`` composition; default:
every registered method but vanilla) and, with ``--ablation``, per ShaRP Table 5 variant
(configs/sweep/table5.yaml). Each row: the sampled frames with the tokens kept after the method's
last stage outlined, the dropped ones dimmed; ShaRP's frame segments under its rows; for a
synthetic doc (``--doc``), a band over the frames where the asked event happens and whether the
greedy answer is right. Every method runs with its settings resolved for the backbone, as ``run.py``
runs it (``sharp.resolve_method``); ``--kwargs '{"pdrop": {"layers": [1, 2, 3]}}'`` sets some. A method that
fails (e.g. a layer outside the model) is drawn as an error row and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp  # noqa: E402
from sharp.figures import selection, video  # noqa: E402
from sharp.engine.method import check_retention  # noqa: E402


def parse_kwargs(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: --kwargs {text!r} is not JSON ({err}); expected e.g. "
                         "'{\"pdrop\": {\"layers\": [1, 2, 3]}}'")
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SystemExit(f"error: --kwargs {text!r}: expected a JSON object of method name -> kwargs object")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy_llava_onevision", help=f"one of {', '.join(sharp.backbone_names())}")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file (needs --question)")
    src.add_argument("--doc", help="a synthetic doc id, e.g. synth-test-s0-00044")
    ap.add_argument("--question", default=None, help="the question (default for --doc: the task's prompt)")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method but vanilla")
    ap.add_argument("--retention", type=float, default=0.25)
    ap.add_argument("--ablation", action="store_true", help="add ShaRP's Table 5 variants as rows")
    ap.add_argument("--kwargs", default="", help="JSON: method name -> kwargs")
    ap.add_argument("--out", default=None, help="PNG path (default: results/figures/selection_<backbone>.png)")
    ap.add_argument("--columns", type=int, default=None, help="frames per line (default: as many as fit 15 in)")
    ap.add_argument("--frame-inches", type=float, default=None, help="drawn frame height")
    ap.add_argument("--title", default=None)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    try:
        check_retention(args.retention)
    except ValueError as err:
        ap.error(f"--retention: {err}")

    registered = sharp.method_names()
    methods = args.methods if args.methods is not None else [m for m in registered
                                                              if not m.startswith("_") and m != "vanilla"]
    unknown = [m for p in methods for m in p.split("+") if m not in registered]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    given = parse_kwargs(args.kwargs)
    bb = sharp.load_backbone(args.backbone, device=args.device)
    # each method resolved for the backbone as run.py resolves it (sharp.resolve_method), given kwargs on top
    method_kwargs = {m: dict(given.get(m, {})) for m in {*methods, "sharp"}}
    vid = video.load_video(bb, video=args.video, question=args.question, doc_id=args.doc)
    rows = selection.run_selections(bb, vid, methods, args.retention, method_kwargs, ablation=args.ablation, log=print)
    out = Path(args.out) if args.out else REPO / "results" / "figures" / f"selection_{args.backbone}.png"
    counts = selection.draw_selections(vid, rows, out, title=args.title, columns=args.columns,
                                       frame_inches=args.frame_inches)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB); kept tokens drawn per row: {counts}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
