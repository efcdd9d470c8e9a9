"""What every figure of :mod:`sharp.figures` shares: the Agg backend, method colours and markers, saving.

Colours: one per method, stable across figures (the order of ``sharp.method_names()``, so a method
keeps its colour in every plot of one checkout); ShaRP is drawn thicker. Markers cycle separately
from colours, so methods beyond the ten colours of the palette still differ.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

# matplotlib's "tab10" minus its red (ShaRP's) and gray (reference lines), then distinct extras
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31", "#843c39", "#5254a3")
OURS_COLOUR = "#d62728"
REFERENCE = "vanilla"  # the unpruned model: black
MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "d", "H", "8")
OURS = "sharp"  # the project's method: drawn with a thicker line

# selection maps
KEPT_EDGE = "#00e5ff"  # outline of a kept token (cyan: none of the synthetic objects' colours)
DIM = 0.28  # brightness of a dropped token's cell
EVENT = "#e41a1c"  # frames where the asked event happens
DISTRACTOR = "#ff9f1c"  # frames of the other objects of a synthetic video
SEGMENT_COLOURS = ("#4d4d4d", "#bdbdbd")  # alternating ShaRP segments
BOUNDARY = "#ffb000"  # a ShaRP segment boundary


def method_style(name: str) -> dict:
    """``color``, ``marker`` and ``linewidth`` of a method (composed names get their own)."""
    from sharp.methods import method_names

    names = [n for n in method_names() if not n.startswith("_") and n not in (OURS, REFERENCE)]
    i = names.index(name) if name in names else len(names) + sum(map(ord, name))
    colour = OURS_COLOUR if name == OURS else "black" if name == REFERENCE else PALETTE[i % len(PALETTE)]
    marker = "*" if name == OURS else "o" if name == REFERENCE else MARKERS[i % len(MARKERS)]
    return {"color": colour, "marker": marker, "linewidth": 2.4 if name == OURS else 1.4}


def save(fig, path: Union[str, Path], dpi: int = 110, colors: Optional[int] = None) -> Path:
    """Write ``fig`` as a PNG (parents created), close it and return the path.

    ``colors``: store a palette PNG of at most that many colours (no dithering): video frames with
    sensor noise otherwise make multi-megabyte files; 256 colours look the same at figure size.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path {str(path)!r}: expected a .png file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if colors is None:
        fig.savefig(path, dpi=dpi)
    else:
        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
        buf.seek(0)
        image = Image.open(buf).convert("RGB")
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
    plt.close(fig)
    return path
