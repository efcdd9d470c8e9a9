"""Fig. 2: the last token's attention over the visual positions, shallow vs deep layer, before and
after PosC's calibration.

Measured through the engine, without pruning: :class:`AttentionRecorder` is a measuring
instrument with the method interface (not registered, keeps every token) whose one stage, before
the deepest requested layer, reads for each requested layer ``k``

* ``real``: ``ctx.last_token_attention(layer=k)`` of the video, the same score ShaRP ranks with
  (softmax over all keys, mean over heads; ShaRP's ``score_at="stage"`` reads it at its pruning
  layer), at the visual positions;
* ``black``: the same score for an all-black video of the same layout, measured by PosC's own
  :func:`sharp.methods.posc.positional_bias` (one probe forward with ``bb.black_inputs``);
* ``calibrated``: Eq. 5, ``a - lam * b``, with ShaRP's ``lam`` (0.6 by default).

Nothing is masked: SegM is off here (it is Sec. 4.1's, not part of the bias), so the curves isolate
the positional bias the paper's Fig. 2 shows. :func:`draw_attention` plots a 3 x 2 grid (rows: video,
black video, calibrated; columns: shallow, deep layer) over the visual token index with the frame
means, the frames of the asked event shaded, and the Pearson correlation of each shallow-layer curve
with the deep layer's attention.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import numpy as np
import torch

from sharp.figures import style
from sharp.figures.video import FigureVideo
from sharp.engine.method import PruningMethod, Selection
from sharp.methods.posc import BiasCache, positional_bias

KINDS = ("real", "black", "calibrated")


def sharp_lam() -> float:
    """ShaRP's default PosC strength lambda (the dataclass default of ``sharp``'s ``lam``)."""
    from sharp.methods import get_method_class

    return next(f.default for f in dataclasses.fields(get_method_class("sharp")) if f.name == "lam")


@dataclass
class AttentionRecorder(PruningMethod):
    """Records the last token's attention (and its PosC bias) in ``layers``; keeps every token.

    Not registered (a measuring instrument, not a pruning method): pass the instance to
    ``sharp.prune``. Results in ``trace.method("attention_recorder").attention``:
    {layer: {"real", "black", "calibrated"} -> (n_visual,) float32} of sample 0.
    """

    name: ClassVar[str] = "attention_recorder"
    layers: tuple = (1, 3)
    lam: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        if not self.layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.layers):
            raise ValueError(f"attention_recorder: layers must be non-negative ints, got {self.layers!r}")

    def stages(self, num_layers: int) -> list[int]:
        bad = [k for k in self.layers if k >= num_layers]
        if bad:
            raise ValueError(f"attention layer(s) {bad} outside the model: valid 0..{num_layers - 1}")
        return [max(self.layers)]

    def score_layers(self, num_layers: int) -> list[int]:
        return sorted(set(self.layers))

    def select(self, ctx) -> Selection:
        results = {}
        for k in sorted(set(self.layers)):
            def score(c, k=k):
                return c.last_token_attention(layer=k)

            real = ctx.gather_visual(score(ctx))[0].float().cpu()
            black = positional_bias(ctx, score, BiasCache(None), reading=f"figures.attention|L={k}")[0].float().cpu()
            results[k] = {"real": real, "black": black, "calibrated": real - self.lam * black}
        ctx.trace.attention = results
        return Selection.unchanged()


def measure_attention(bb, inputs: dict, layers: tuple, lam: Optional[float] = None) -> dict:
    """{layer: {"real", "black", "calibrated"} -> (n_visual,) float32} for sample 0 of ``inputs``."""
    import sharp

    recorder = AttentionRecorder(layers=tuple(int(k) for k in layers), lam=sharp_lam() if lam is None else float(lam))
    with torch.no_grad(), sharp.prune(bb, recorder) as trace:
        bb.model(**inputs, use_cache=False)
    return trace.method(AttentionRecorder.name).attention


def default_layers(bb) -> tuple[int, int]:
    """(shallow, deep): ShaRP's scoring layer (its default ``layer``, 1) and the layer three quarters
    of the way down (toy / tiny: 3 of 4; 7B: 21 of 28)."""
    from sharp.methods import get_method_class

    shallow = next(f.default for f in dataclasses.fields(get_method_class("sharp")) if f.name == "layer")
    deep = max(shallow + 1, (3 * bb.num_layers) // 4)
    return min(shallow, bb.num_layers - 1), min(deep, bb.num_layers - 1)


def _frame_means(values: np.ndarray, tokens_per_frame: int) -> np.ndarray:
    return values.reshape(-1, tokens_per_frame).mean(axis=1)


def top_share(values: np.ndarray, video: FigureVideo, retention: float) -> dict:
    """Where the ``round(retention x N)`` highest-scored tokens are (what a top-k pruner at that
    retention would keep): how many lie in the event frames and in the last quarter of the video."""
    from sharp.methods import budget

    n, per = values.size, video.layout.tokens_per_frame
    k = budget(n, retention)
    top = np.argsort(-values, kind="stable")[:k]
    frames = top // per
    return {"k": k, "event": int(np.isin(frames, video.event_frames).sum()),
            "event_total": len(video.event_frames) * per, "last_quarter": int((top >= n - n // 4).sum())}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


ROW_TITLES = {"real": "video", "black": "all-black video (PosC bias b)",
              "calibrated": "calibrated: a - {lam:g} b (Eq. 5)"}


def draw_attention(video: FigureVideo, attention: dict, path: Union[str, Path], backbone: str = "",
                   lam: Optional[float] = None, retention: float = 0.25, dpi: int = 110) -> dict:
    """Plot Fig. 2 into the PNG ``path``. Returns {(kind, layer): {"r": Pearson r with the deep layer's
    video attention (per token), **:func:`top_share` at ``retention``}}."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lam = sharp_lam() if lam is None else lam
    layers = sorted(attention)
    deep = layers[-1]
    per = video.layout.tokens_per_frame
    n = video.layout.n_visual
    reference = attention[deep]["real"].numpy()
    fig, axes = plt.subplots(len(KINDS), len(layers), figsize=(5.6 * len(layers), 8.0), sharex=True, squeeze=False)
    correlations = {}
    x = np.arange(n)
    centres = (np.arange(video.layout.frames) + 0.5) * per - 0.5
    for i, kind in enumerate(KINDS):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            values = attention[layer][kind].numpy()
            for f in video.event_frames:
                ax.axvspan(f * per - 0.5, (f + 1) * per - 0.5, color=style.EVENT, alpha=0.15, linewidth=0)
            ax.plot(x, values * 1e3, color="#7f7f7f", linewidth=0.7, alpha=0.8)
            ax.plot(centres, _frame_means(values, per) * 1e3, color=style.PALETTE[0], linewidth=1.6, marker=".",
                    markersize=3)
            if kind == "calibrated":
                ax.axhline(0, color="black", linewidth=0.6)
            stats = {"r": _pearson(values, reference), **top_share(values, video, retention)}
            correlations[(kind, layer)] = stats
            notes = [f"top {stats['k']} ({100 * retention:g}%): {stats['last_quarter']} in the last quarter"]
            if video.event_frames:
                notes[0] += f", {stats['event']}/{stats['event_total']} in event frames"
            if not (kind == "real" and layer == deep):
                notes.append(f"r with layer {deep} video: {stats['r']:+.2f}")
            ax.set_title(f"layer {layer}: {ROW_TITLES[kind].format(lam=lam)}\n{'; '.join(notes)}", fontsize=8,
                         pad=18 if i == 0 else 6)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("attention of the last token\n(probability x 1e-3)", fontsize=8)
            if i == len(KINDS) - 1:
                unit = "frame" if video.frames_per_visual == 1 else "temporal patch"
                ax.set_xlabel(f"visual token index ({per} tokens per {unit}; top axis of the first row: {unit})",
                              fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlim(-0.5, n - 0.5)
            if i == 0:
                top = ax.secondary_xaxis("top", functions=(lambda t: (t + 0.5) / per, lambda f: f * per - 0.5))
                top.tick_params(labelsize=6.5, pad=1)
    handles = [Line2D([], [], color="#7f7f7f", linewidth=0.8, label="per token"),
               Line2D([], [], color=style.PALETTE[0], linewidth=1.6, marker=".", label="mean over each frame's tokens")]
    if video.event_frames:
        handles.append(Patch(color=style.EVENT, alpha=0.25, label="frames where the asked event happens"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    what = f"{backbone}: " if backbone else ""
    frames_note = (f"; a visual frame is a temporal patch of {video.frames_per_visual} frames"
                   if video.frames_per_visual > 1 else "")
    fig.suptitle(f"{what}last token's attention over the visual tokens, shallow vs deep layer ({video.name}"
                 f"{frames_note})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    style.save(fig, path, dpi=dpi)
    return correlations
