#!/usr/bin/env python
"""Fig. 2: the last token's attention over the visual positions in a shallow and a deep layer, for the
video, an all-black video (PosC's positional bias) and after PosC's calibration (Eq. 5).

    python scripts/show_attention.py --backbone toy_llava_onevision --doc synth-test-s0-00044 \\
        --out docs/figures/attention.png
    python scripts/show_attention.py --backbone llava_onevision_7b --video clip.mp4 --question "..." --layers 2 20

The score is ShaRP's (softmax over all keys, mean over heads, read at the visual positions); the
black-video bias is measured by PosC's own probe (sharp.methods.posc.positional_bias), and the
calibrated score is a - lam * b with ShaRP's lam (0.6). Default layers: ShaRP's scoring layer (1) and
the layer three quarters down the model. Each panel says where the top-k tokens at ``--retention``
lie (last quarter of the video, event frames of a synthetic doc) and the Pearson r of the curve with
the deep layer's video attention.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sharp  # noqa: E402
from sharp.figures import attention, video  # noqa: E402
from sharp.engine.method import check_retention  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy_llava_onevision", help=f"one of {', '.join(sharp.backbone_names())}")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file (needs --question)")
    src.add_argument("--doc", help="a synthetic doc id, e.g. synth-test-s0-00044")
    ap.add_argument("--question", default=None, help="the question (default for --doc: the task's prompt)")
    ap.add_argument("--layers", nargs=2, type=int, default=None, metavar=("SHALLOW", "DEEP"),
                    help="decoder layers whose maps are drawn (default: ShaRP's layer 1 and 3/4 down the model)")
    ap.add_argument("--lam", type=float, default=None, help="PosC strength (default: ShaRP's 0.6)")
    ap.add_argument("--retention", type=float, default=0.25, help="top-k share summarised in each panel")
    ap.add_argument("--out", default=None, help="PNG path (default: results/figures/attention_<backbone>.png)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    try:
        check_retention(args.retention)
    except ValueError as err:
        ap.error(f"--retention: {err}")

    bb = sharp.load_backbone(args.backbone, device=args.device)
    layers = tuple(args.layers) if args.layers else attention.default_layers(bb)
    bad = [k for k in layers if not 0 <= k < bb.num_layers]
    if bad or layers[0] >= layers[1]:
        ap.error(f"--layers {layers[0]} {layers[1]}: expected SHALLOW < DEEP in 0..{bb.num_layers - 1}")
    vid = video.load_video(bb, video=args.video, question=args.question, doc_id=args.doc)
    maps = attention.measure_attention(bb, vid.inputs, layers, lam=args.lam)
    out = Path(args.out) if args.out else REPO / "results" / "figures" / f"attention_{args.backbone}.png"
    stats = attention.draw_attention(vid, maps, out, backbone=args.backbone, lam=args.lam, retention=args.retention)
    for (kind, layer), s in stats.items():
        where = f", {s['event']}/{s['event_total']} in event frames" if vid.event_frames else ""
        print(f"layer {layer:>2d} {kind:>10s}: top {s['k']} -> {s['last_quarter']} in the last quarter{where}; "
              f"r with layer {layers[-1]} video {s['r']:+.2f}")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
