"""Fig. 5: which visual tokens each method keeps, drawn on the sampled frames.

:func:`run_selection` runs one method (any registered name, a registered combination or a
``+``-composition) through ``sharp.prune`` with greedy generation and reads the engine's
:class:`~sharp.Trace`, the same for every method, pre-LLM (stage at layer 0) or in-LLM:

* ``trace.kept[-1][0]``: the ORIGINAL visual indices present after the last applied stage (a
  method that merges, e.g. ShaRP's RegD or FrameFusion, keeps tokens that absorbed others: those
  are the ones drawn); no applied stage = every token;
* ``trace.stage_layers`` and ``trace.visual_tokens_per_layer`` for the row's label;
* ``segments`` of any method namespace that has them (ShaRP's Eq. 3 segments: per sample a list
  of ``(first_frame, last_frame)``), drawn as a band under the frames with the boundaries marked.

:func:`draw_selections` draws one row per selection (wrapped over several lines when the video has
many frames): each frame with its token grid, dropped tokens dimmed, kept ones outlined, and for a
synthetic doc a band over the frames where the asked event happens. It returns, per row, the number
of kept-token outlines it drew (a ``PatchCollection`` with gid ``"kept"``), which the tests compare
with the method's kept count.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sharp.figures import style
from sharp.figures.video import FigureVideo

ANSWER_END = "<|im_end|>"


@dataclass
class MethodSelection:
    """What one method kept on one video (sample 0 of the batch).

    kept: (k,) ORIGINAL visual indices kept after the last stage, ascending; stage_layers and
    tokens_per_layer: from the trace; segments: ShaRP's (first_frame, last_frame) pairs or None;
    answer: the greedy answer text; error: the exception text when the method failed (kept empty).
    """

    label: str
    method: str
    retention: float
    n_visual: int
    kept: torch.Tensor
    stage_layers: list = field(default_factory=list)
    tokens_per_layer: list = field(default_factory=list)
    segments: Optional[list] = None
    answer: str = ""
    kwargs: dict = field(default_factory=dict)
    error: str = ""
    stage_kept: list = field(default_factory=list)  # [stage] -> (k_s,) ORIGINAL indices after that stage

    @property
    def kept_count(self) -> int:
        return int(self.kept.numel())

    def survival(self) -> torch.Tensor:
        """(n_visual,) long: how many of the applied stages each token went through (kept ones: all)."""
        out = torch.zeros(self.n_visual, dtype=torch.long)
        for kept in self.stage_kept:
            out[kept] += 1
        return out


def _segments_of(trace) -> Optional[list]:
    """The first method namespace's ``segments`` of sample 0 if they are (first, last) frame pairs."""
    for ns in trace.methods.values():
        segs = getattr(ns, "segments", None)
        if not segs:
            continue
        first = segs[0]
        if isinstance(first, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in first):
            return [(int(a), int(b)) for a, b in first]
    return None


def run_selection(bb, video: FigureVideo, method: str, retention: float, label: Optional[str] = None,
                  max_new_tokens: int = 4, catch: bool = True, **kwargs) -> MethodSelection:
    """Run ``method`` at ``retention`` on ``video`` (greedy generation) and read what it kept.

    With ``catch`` an exception (a kwarg that does not fit the backbone, ...) becomes the row's
    ``error`` instead of stopping the figure.
    """
    import sharp

    label = label or method
    n_visual = video.layout.n_visual
    try:
        with torch.no_grad(), sharp.prune(bb, method, retention, **kwargs) as trace:
            out = bb.model.generate(**video.inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=bb.tokenizer.pad_token_id, eos_token_id=bb.tokenizer.eos_token_id)
    except Exception as err:  # noqa: BLE001 - drawn as an error row when catch
        if not catch:
            raise
        return MethodSelection(label, method, retention, n_visual, torch.zeros(0, dtype=torch.long), kwargs=kwargs,
                               error=f"{type(err).__name__}: {err}")
    text = bb.tokenizer.decode(out[0, video.inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    text = text.split(ANSWER_END)[0].replace(bb.tokenizer.pad_token or "", "").strip()
    kept = trace.kept[-1][0].cpu().sort().values if trace.kept else torch.arange(n_visual)
    return MethodSelection(label, method, retention, n_visual, kept, list(trace.stage_layers),
                           list(trace.visual_tokens_per_layer), _segments_of(trace), text, kwargs,
                           stage_kept=[k[0].cpu() for k in trace.kept])


def ablation_variants() -> list[tuple[str, dict]]:
    """ShaRP's Table 5 variants, as ``configs/sweep/table5.yaml`` lists them (scripts/ablation.py):
    (variant name, ShaRP kwargs switching posc / segm / regd), the full method last."""
    from sharp.harness.config import load_sweep

    return [(cell.get("variant") or "sharp", dict(cell.get("method_kwargs") or {}))
            for cell in load_sweep("table5")["cells"]]


def run_selections(bb, video: FigureVideo, methods: Sequence[str], retention: float,
                   method_kwargs: Optional[dict] = None, ablation: bool = False, log=None) -> list[MethodSelection]:
    """One :class:`MethodSelection` per method, then (``ablation``) per ShaRP Table 5 variant.

    ``method_kwargs``: method name -> kwargs (ShaRP's also apply to its ablation variants).
    """
    method_kwargs = method_kwargs or {}
    rows = []
    for m in methods:
        rows.append(run_selection(bb, video, m, retention, **method_kwargs.get(m, {})))
        if log:
            log(_row_summary(rows[-1]))
    if ablation:
        for variant, switches in ablation_variants():
            if variant == "sharp" and "sharp" in methods:
                continue  # the full method is already a row
            kwargs = {**method_kwargs.get("sharp", {}), **switches}
            label = "sharp (all three)" if variant == "sharp" else f"sharp: {variant}"
            rows.append(run_selection(bb, video, "sharp", retention, label=label, **kwargs))
            if log:
                log(_row_summary(rows[-1]))
    return rows


def _row_summary(row: MethodSelection) -> str:
    if row.error:
        return f"{row.label:>22s}: ERROR {row.error}"
    return (f"{row.label:>22s}: kept {row.kept_count}/{row.n_visual}, stages at layers {row.stage_layers}, "
            f"visual tokens per layer {row.tokens_per_layer}, answer {row.answer!r}")


# -- drawing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Pixel geometry of one line of frames: frame size, gap, bands."""

    fh: int  # frame height (px of the mosaic)
    fw: int
    gap: int
    columns: int

    @property
    def pitch(self) -> int:
        return self.fw + self.gap

    def x0(self, column: int) -> int:
        return column * self.pitch


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if frame.shape[:2] == (h, w):
        return frame
    return np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.BILINEAR))


def _frame_mask(kept: torch.Tensor, layout) -> np.ndarray:
    """(F, gh, gw) bool: True where the token (frame, row, col) is kept."""
    gh, gw = layout.grid
    mask = np.zeros(layout.n_visual, dtype=bool)
    mask[kept.numpy()] = True
    return mask.reshape(layout.frames, gh, gw)


def _brightness(row: MethodSelection, layout) -> np.ndarray:
    """(F, gh, gw) float in (0, 1]: 1 for kept tokens, ``style.DIM`` for tokens dropped at the first
    stage, in between (linearly) for tokens a multi-stage method dropped at a later stage."""
    gh, gw = layout.grid
    stages = max(1, len(row.stage_kept))
    level = row.survival().numpy().astype(np.float32) / stages  # 0 .. 1 (1 = kept)
    bright = np.where(level >= 1, 1.0, style.DIM + (1 - style.DIM) * 0.6 * level)
    bright[row.kept.numpy()] = 1.0
    if not row.stage_kept:  # no stage applied: every token is kept (or the row failed: none)
        bright[:] = 1.0 if row.kept_count == row.n_visual else style.DIM
    return bright.reshape(layout.frames, gh, gw)


def _cell_edges(size: int, cells: int) -> np.ndarray:
    return np.round(np.arange(cells + 1) * size / cells).astype(int)


def _mosaic(display: np.ndarray, bright: np.ndarray, frames: Sequence[int], geo: _Geometry) -> np.ndarray:
    """One line of frames side by side, each token cell scaled by its brightness (white gaps)."""
    gh, gw = bright.shape[1:]
    ys, xs = _cell_edges(geo.fh, gh), _cell_edges(geo.fw, gw)
    img = np.full((geo.fh, geo.columns * geo.pitch - geo.gap, 3), 255, dtype=np.float32)
    for j, f in enumerate(frames):
        tile = _resize(display[f], geo.fh, geo.fw).astype(np.float32)
        for r in range(gh):
            for c in range(gw):
                if bright[f, r, c] < 1:
                    tile[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] *= bright[f, r, c]
        img[:, geo.x0(j):geo.x0(j) + geo.fw] = tile
    return img.astype(np.uint8)


def _kept_rectangles(mask: np.ndarray, frames: Sequence[int], geo: _Geometry) -> list:
    from matplotlib.patches import Rectangle

    gh, gw = mask.shape[1:]
    ys, xs = _cell_edges(geo.fh, gh), _cell_edges(geo.fw, gw)
    rects = []
    for j, f in enumerate(frames):
        for r, c in zip(*np.nonzero(mask[f])):
            x, y = geo.x0(j) + xs[c] - 0.5, ys[r] - 0.5
            rects.append(Rectangle((x, y), xs[c + 1] - xs[c], ys[r + 1] - ys[r]))
    return rects


def _row_label(row: MethodSelection, video: FigureVideo) -> str:
    name = row.label
    if row.error:
        return f"{name}\nerror"
    lines = [name, f"kept {row.kept_count}/{row.n_visual} ({100 * row.kept_count / row.n_visual:.0f}%)"]
    if row.stage_layers:
        where = [("before the LLM" if k == 0 else f"layer {k}") for k in row.stage_layers]
        if len(where) > 1 and where[0] == "before the LLM":
            where[1:] = [w.replace("layer ", "") for w in where[1:]]
            text = "pre-LLM + layer" + ("s " if len(where) > 2 else " ") + ", ".join(where[1:])
        elif len(where) > 1:
            text = "before layers " + ", ".join(w.replace("layer ", "") for w in where)
        else:
            text = where[0] if where[0] == "before the LLM" else f"before {where[0]}"
        lines.append(f"pruned {text}")
    else:
        lines.append("no stage applied")
    if video.event_frames:
        kept_there = int(_frame_mask(row.kept, video.layout)[video.event_frames].sum())
        lines.append(f"in event frames: {kept_there}/{len(video.event_frames) * video.layout.tokens_per_frame}")
    if row.answer or video.doc is not None:
        answer = "".join(ch if ch.isprintable() else "?" for ch in row.answer[:12]) or "(none)"
        if video.doc is not None:
            from sharp.synthetic.lmms_task.utils import extract_letter

            ok = extract_letter(row.answer, video.doc["options"]) == video.answer
            answer += " (right)" if ok else " (wrong)"
        lines.append(f"answer: {answer}")
    return "\n".join(lines)


def _draw_bands(ax, video: FigureVideo, row: MethodSelection, frames: Sequence[int], geo: _Geometry,
                band: float) -> None:
    """Event band over the frames; ShaRP's segment band under them, boundaries as vertical lines."""
    from matplotlib.patches import Rectangle

    for j, f in enumerate(frames):
        colour = style.EVENT if f in video.event_frames else style.DISTRACTOR if f in video.distractor_frames else None
        if colour is not None:
            ax.add_patch(Rectangle((geo.x0(j) - 0.5, -band - 1.5), geo.fw, band, color=colour, gid="event",
                                   clip_on=False))
    if row.segments is None:
        return
    shown = set(frames)
    for s, (first, last) in enumerate(row.segments):
        cols = [j for j, f in enumerate(frames) if first <= f <= last]
        if not cols:
            continue
        x0, x1 = geo.x0(cols[0]) - 0.5, geo.x0(cols[-1]) + geo.fw - 0.5
        ax.add_patch(Rectangle((x0, geo.fh + 1), x1 - x0, band, color=style.SEGMENT_COLOURS[s % 2],
                               gid="segment", clip_on=False))
        if first > 0 and first in shown:  # a boundary before this segment's first frame
            x = geo.x0(frames.index(first)) - geo.gap / 2 - 0.5
            ax.plot([x, x], [-band - 1.5, geo.fh + band + 1], color=style.BOUNDARY, linewidth=2.2,
                    solid_capstyle="butt", clip_on=False, gid="boundary")


def _caption(video: FigureVideo, rows: Sequence[MethodSelection]) -> str:
    gh, gw = video.layout.grid
    parts = [f"Each frame shows its {gh}x{gw} visual tokens: kept tokens (after the method's last stage) bright with "
             f"a cyan outline, dropped tokens dimmed; tokens that absorbed others (merging methods) count as kept."]
    if any(len(r.stage_kept) > 1 for r in rows):
        parts.append("Multi-stage rows: the later a stage dropped a token, the less it is dimmed.")
    if video.frames_per_visual > 1:
        parts.append(f"Qwen2-VL pairs frames into temporal patches: each column is one temporal patch of "
                     f"{video.frames_per_visual} frames, drawn on its first frame.")
    parts.append("Numbers under the last row: " + ("temporal patch" if video.frames_per_visual > 1 else "frame")
                 + " index (of the sampled frames).")
    if video.event_frames:
        parts.append("Red band: frames where the asked event happens"
                     + ("; orange: the distractor object." if video.distractor_frames else "."))
    if any(r.segments is not None for r in rows):
        parts.append("Gray bands under a row: ShaRP's frame segments (Eq. 3); amber lines: segment boundaries.")
    return " ".join(parts)


LABEL_FONT = 7  # points


def _draw_line(fig, rect, video: FigureVideo, row: MethodSelection, frames: list, geo: _Geometry, band: float,
               mask: np.ndarray, bright: np.ndarray, frame_inches: float, numbers: bool, first: bool) -> int:
    """One line of one row: frames, kept outlines, bands; returns the outlines drawn."""
    from matplotlib.collections import PatchCollection

    ax = fig.add_axes(rect)
    width = geo.columns * geo.pitch - geo.gap
    ax.imshow(_mosaic(video.display, bright, frames, geo), interpolation="nearest", aspect="auto",
              extent=(-0.5, width - 0.5, geo.fh - 0.5, -0.5))
    rects = _kept_rectangles(mask, frames, geo)
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=style.KEPT_EDGE, linewidth=1.0, gid="kept"))
    _draw_bands(ax, video, row, frames, geo, band)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(geo.fh - 0.5, -0.5)
    ax.set_xticks([])
    if numbers:  # frame numbers under the figure's last row only (columns align across rows)
        for j, f in enumerate(frames):
            ax.text(geo.x0(j) + geo.fw / 2, geo.fh + 2.2 * band, str(f), ha="center", va="top", fontsize=6)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if row.error and first:
        ax.text(width / 2, geo.fh / 2, textwrap.fill(row.error, int(width / geo.fh * frame_inches * 16)),
                ha="center", va="center", fontsize=6.5, color="#b30000", bbox=dict(facecolor="white", alpha=0.9))
    return len(rects)


def draw_selections(video: FigureVideo, rows: Sequence[MethodSelection], path: Union[str, Path],
                    title: Optional[str] = None, columns: Optional[int] = None,
                    frame_inches: Optional[float] = None, dpi: int = 100) -> dict:
    """Draw ``rows`` on ``video``'s frames into the PNG ``path``.

    columns: frames per line (default: every frame on one line if that fits 15 inches, else wrapped);
    frame_inches: drawn frame height (default: larger for finer token grids).
    Returns {row label: number of kept-token outlines drawn}.
    """
    import matplotlib.pyplot as plt

    layout = video.layout
    n_frames = layout.frames
    gh, gw = layout.grid
    frame_inches = frame_inches or max(0.42, 0.085 * max(gh, gw))
    h, w = video.display.shape[1:3]
    fh = max(8 * gh, int(round(frame_inches * dpi)))
    fw = max(8 * gw, int(round(fh * w / h)))
    gap = max(2, fh // 16)
    frame_w_in = (fw + gap) / fh * frame_inches
    columns = columns or max(1, min(n_frames, int(15 // frame_w_in)))
    geo = _Geometry(fh=fh, fw=fw, gap=gap, columns=columns)
    band = max(3.0, fh / 10)
    lines_per_row = -(-n_frames // columns)

    labels = [_row_label(row, video) for row in rows]
    label_in = 0.1 + max(len(x) for lab in labels for x in lab.split("\n")) * LABEL_FONT * 0.55 / 72
    line_in = frame_inches * (1 + 2 * band / fh) + 0.2
    row_in = [max(lines_per_row * line_in, (lab.count("\n") + 1) * LABEL_FONT * 1.3 / 72 + 0.12) + 0.08
              for lab in labels]
    width_in = max(6.0, label_in + columns * frame_w_in + 0.25)
    chars = int(width_in * 72 / (7 * 0.6))  # characters of 7-pt text per line
    head = title or f"Kept visual tokens per method: {video.name}"
    sub = textwrap.fill(f"question: {' '.join(video.question.split())}"
                        + (f"  (answer {video.answer})" if video.answer else ""), chars)
    caption = textwrap.fill(_caption(video, rows), chars)
    top_in = 0.3 + (sub.count("\n") + 1) * 0.13 + 0.1
    bottom_in = 0.1 + (caption.count("\n") + 1) * 0.13
    height_in = top_in + bottom_in + sum(row_in)
    fig = plt.figure(figsize=(width_in, height_in))
    fig.text(0.1 / width_in, 1 - 0.08 / height_in, head, fontsize=10, weight="bold", va="top")
    fig.text(0.1 / width_in, 1 - 0.32 / height_in, sub, fontsize=7, va="top")
    fig.text(0.1 / width_in, 0.06 / height_in, caption, fontsize=7, va="bottom")

    counts: dict = {}
    top = height_in - top_in  # inches from the bottom
    for row, label, height in zip(rows, labels, row_in):
        mask, bright = _frame_mask(row.kept, layout), _brightness(row, layout)
        fig.text((label_in - 0.08) / width_in, (top - height / 2) / height_in, label, ha="right", va="center",
                 fontsize=LABEL_FONT, color="#b30000" if row.error else "black")
        block = lines_per_row * line_in
        y = top - (height - block) / 2  # the row's lines, centred on its label
        drawn = 0
        for line in range(lines_per_row):
            frames = list(range(line * columns, min(n_frames, (line + 1) * columns)))
            y -= line_in
            rect = [label_in / width_in, (y + line_in - frame_inches - band / fh * frame_inches - 0.02) / height_in,
                    columns * frame_w_in / width_in, frame_inches / height_in]
            drawn += _draw_line(fig, rect, video, row, frames, geo, band, mask, bright, frame_inches,
                                numbers=row is rows[-1], first=line == 0)
        counts[row.label] = drawn
        top -= height
    style.save(fig, path, dpi=dpi, colors=256)
    return counts
