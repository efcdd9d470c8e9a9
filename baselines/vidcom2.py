"""VidCom2 (Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video
Large Language Models", EMNLP 2025; official code xuyang-liu16/VidCom2 at 944a17d,
``token_compressor/vidcom2/vidcom2.py``: ``vidcom2_compression``).

Before the LLM (a stage at decoder layer 0, on the visual tokens as they enter the LLM: LLaVA-OV's
projected and bilinear-pooled embeddings before the trailing ``image_newline``; Qwen2.5/3-VL's merger
output), on one video x of T frames (Qwen: temporal patches) with M_t current tokens each and C
channels, retention r:

1. Low-variance channels (``select_low_var_channels``). The biased variance of every channel over
   all N = sum_t M_t tokens, sigma^2_c = mean_n (x_nc - mean_n x_nc)^2; keep the
   c' = int(``channel_ratio`` x C) channels with the LOWEST variance (3584 -> 1792).
2. Multi-scale Gaussian similarity (``compute_gaussian_scores``). x-hat = L2-normalised rows within
   those channels; the video centre g = mean over all tokens of x-hat and the frame centres
   f_t = mean over frame t of x-hat (neither renormalised);

       K(x, c) = sum_{a in 1/8, 1/4, 1/2, 1, 2} exp(-||x - c||^2 / (2a))
       V_ti = K(x-hat_ti, g)     (similarity to the video)      F_ti = K(x-hat_ti, f_t)  (to its frame)

3. Per-frame budgets from frame uniqueness (``compute_scales``). u_t = -mean_i V_ti (a frame far
   from the video is unique); p = softmax((u - max u) / tau), tau = ``temperature`` = 0.01;

       s_t = min(1, r (1 + p_t - mean_t p_t))            (mean_t p_t = 1/T)

4. Outliers per frame (``select_outlier_indices``). k_t = max(1, round(s_t M)) (torch rounds half to
   even), M the frame's ORIGINAL token count; keep the k_t tokens of frame t with the LOWEST V + F
   (least like the video and their frame), in sequence order (frame-major, raster inside a frame).

sum_t k_t is not round(r N) in general (every frame gets r (1 - 1/T) plus r p_t, rounded on its
own), so the kept count depends on the video: ``input_dependent_schedule``, the trace holds the
measured counts and ``token_schedule`` is a nominal round(r N) from layer 0 on.

Our choices (docs/methods/vidcom2.md has each next to the official file it follows):
- Compute dtype ``compute_dtype``: "float32" (default) casts the embeddings to float32 for Steps 1-4;
  "model" computes in the embeddings' own dtype as the official code does (fp16 on its LLaVA runs,
  bf16 on Qwen2.5-VL), "float64" is for exact references.
- One video per sample, run per sample (the official Qwen paths switch compression off for batch > 1;
  its LLaVA path loops over the videos).
- Frames with unequal current counts (composed after another method): variance and g over all current
  tokens, f_t and u_t over each frame's current tokens, T the frames with at least one current token,
  k_t = min(M_t, max(1, round(s_t M))) with M the original tokens per frame (budgets are shares of the
  ORIGINAL tokens; a stage never keeps more than it receives). Equal full frames: the official maths.
- Positions: ``official_positions = "compact"`` (LLaVA renumbers the shorter sequence 0..len-1);
  ``positions="auto"`` keeps the original M-RoPE ids on Qwen, as the official Qwen2.5-VL / Qwen3-VL
  forwards (``position_ids[:, :, keep]``); the official Qwen2-VL path is broken (it indexes with the
  gathered features) and is not followed.
- Retention 1 is NOT the identity: s_t = min(1, 1 + p_t - 1/T) < 1 for every frame with p_t < 1/T, as
  in the official code.

Results go to ``trace.method("vidcom2")``: per sample ``frame_budget`` (k_t), ``frame_share`` (s_t),
``frame_weight`` (p_t), ``uniqueness`` (u_t), ``kept_count`` (sum k_t), and ``channels`` (c'),
``compute_dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sharp import PruningMethod, Selection, budget

# the kernel widths a of K(x, c) (official ``alphas = [2**k for k in range(-3, 2)]``)
ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "model": None}


# -- Step 1 -------------------------------------------------------------------------------------


def low_variance_channels(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(n, C) -> indices of the int(ratio x C) channels (at least 1) with the lowest biased variance
    over the n tokens (official ``select_low_var_channels``)."""
    variance = ((x - x.mean(dim=0)) ** 2).mean(dim=0)  # (C,), = x.var(0, unbiased=False), 3x faster on CPU
    k = max(1, int(x.shape[-1] * ratio))
    return torch.topk(variance, k, largest=False).indices


# -- Step 2 -------------------------------------------------------------------------------------


def gaussian_kernel(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """K(x, c) = sum_a exp(-||x - c||^2 / (2a)) per row: x (n, c'), centre (n, c') or (c',) -> (n,)."""
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in ALPHAS)


def frame_means(values: torch.Tensor, frame: torch.Tensor, frames: int) -> torch.Tensor:
    """Mean of ``values`` (n, ...) over each frame's rows; frame (n,) in 0..frames-1 -> (frames, ...)."""
    sums = values.new_zeros((frames,) + values.shape[1:]).index_add_(0, frame, values)
    counts = torch.bincount(frame, minlength=frames).to(values.dtype)
    return sums / counts.view((frames,) + (1,) * (values.dim() - 1))


def video_and_frame_scores(x: torch.Tensor, frame: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, F), each (n,): the Gaussian similarity of every L2-normalised token x-hat (n, c') to the
    video centre g (the mean of all x-hat) and to its frame's centre f_t (official
    ``compute_gaussian_scores``; the centres are not renormalised)."""
    unit = F.normalize(x, dim=-1)
    video_centre = unit.mean(dim=0)  # (c',)
    frame_centre = frame_means(unit, frame, frames)  # (T, c')
    return gaussian_kernel(unit, video_centre), gaussian_kernel(unit, frame_centre.index_select(0, frame))


# -- Step 3 -------------------------------------------------------------------------------------


def frame_shares(uniqueness: torch.Tensor, retention: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, p), each (T,): p = softmax((u - max u) / tau), s_t = min(1, r (1 + p_t - mean p))
    (official ``compute_scales``; mean p = 1/T up to rounding)."""
    p = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    return (retention * (1 + p - p.mean())).clamp(max=1.0), p


def frame_budgets(shares: torch.Tensor, frame_tokens: int, counts: torch.Tensor) -> torch.Tensor:
    """k_t = min(M_t, max(1, round(s_t M))) (T,) long: M the ORIGINAL tokens per frame, M_t the
    current ones (official ``(scales * tpf).round().long().clamp(min=1)``; round half to even)."""
    return torch.minimum((shares * frame_tokens).round().long().clamp(min=1), counts)


# -- Step 4 -------------------------------------------------------------------------------------


def lowest_per_frame(scores: torch.Tensor, frame: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the k[t] lowest ``scores`` (n,) among the rows of each frame t
    (official ``select_outlier_indices``: topk(largest=False) per frame, sorted), without a loop:
    the rows sorted by (frame, score), kept while their rank inside the frame is below k[frame]."""
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(frame[order], stable=True)]  # frame-major, ascending score inside
    counts = torch.bincount(frame, minlength=len(k))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[frame[order]]
    return order[rank < k[frame[order]]].sort().values


# -- one video ------------------------------------------------------------------------------------


@dataclass
class VideoResult:
    """VidCom2 on one video: ``keep`` (n_kept,) indices into its tokens, ascending; per frame
    (present frames, in order) ``budget`` k_t, ``share`` s_t, ``weight`` p_t, ``uniqueness`` u_t;
    ``channels`` c'."""

    keep: torch.Tensor
    budget: torch.Tensor
    share: torch.Tensor
    weight: torch.Tensor
    uniqueness: torch.Tensor
    channels: int


def vidcom2_video(x: torch.Tensor, frame: torch.Tensor, retention: float, frame_tokens: int,
                  channel_ratio: float = 0.5, temperature: float = 0.01) -> VideoResult:
    """Steps 1-4 on one video: x (n, C) its tokens (computed in x's dtype), frame (n,) any frame ids
    (frames with no token are absent), ``frame_tokens`` M the original tokens per frame."""
    _, frame = torch.unique(frame, return_inverse=True)  # present frames -> 0..T-1
    frames = int(frame.max()) + 1
    channels = low_variance_channels(x, channel_ratio)
    v, f = video_and_frame_scores(x.index_select(1, channels), frame, frames)
    uniqueness = -frame_means(v, frame, frames)  # u_t = -mean_i V_ti
    share, weight = frame_shares(uniqueness, retention, temperature)
    counts = torch.bincount(frame, minlength=frames)
    k = frame_budgets(share, frame_tokens, counts)
    keep = lowest_per_frame(v + f, frame, k)
    return VideoResult(keep, k, share, weight, uniqueness, len(channels))


# -- the method -----------------------------------------------------------------------------------


@dataclass
class VidCom2(PruningMethod):
    """VidCom2 before the LLM; ``retention`` = r, the kept share of the ORIGINAL visual tokens
    (official R_RATIO, default 0.25); the kept count is about r N, decided per video. See
    docs/methods/vidcom2.md."""

    name = "vidcom2"
    # LLaVA: the compressed features are concatenated into a shorter sequence numbered 0..len-1;
    # Qwen2.5/3-VL (M-RoPE): original ids (positions="auto" gives them)
    official_positions = "compact"
    input_dependent_schedule: ClassVar[bool] = True  # sum_t k_t depends on the frames' uniqueness
    # at r = 1, s_t = min(1, 1 + p_t - 1/T) < 1 for the frames with p_t < 1/T: tokens are still dropped
    identity_at_full_retention: ClassVar[bool] = False
    channel_ratio: float = 0.5  # share of the channels (lowest variance) the similarities use (official 0.5)
    temperature: float = 0.01  # tau of the frame-uniqueness softmax (official ``temp=0.01``)
    # "float32" | "float64" | "model" (the embeddings' own dtype: the official fp16 / bf16)
    compute_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.channel_ratio <= 1.0:
            raise ValueError(f"vidcom2: channel_ratio must be in (0, 1] (the share of lowest-variance channels; "
                             f"official 0.5), got {self.channel_ratio!r}")
        if not self.temperature > 0.0:
            raise ValueError(f"vidcom2: temperature must be > 0 (the frame softmax's tau; official 0.01), "
                             f"got {self.temperature!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"vidcom2: compute_dtype must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, "
                             f"got {self.compute_dtype!r}")

    # -- where ---------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        return [0]  # before the LLM: on the input embeddings

    # -- what ------------------------------------------------------------------------------------
    def select(self, ctx) -> Selection:
        dtype = COMPUTE_DTYPES[self.compute_dtype]
        frame_tokens = ctx.layout.tokens_per_frame
        results = []
        for b in range(ctx.batch_size):  # one video per sample, run per sample
            tokens = ctx.visual_tokens(b)
            x = ctx.hidden_states[b, tokens.positions]  # (n_b, C)
            x = x if dtype is None else x.to(dtype)
            results.append(vidcom2_video(x, tokens.frame, self.retention, frame_tokens,
                                         self.channel_ratio, self.temperature))
        self.record(ctx, results)
        if all(len(r.keep) == n for r, n in zip(results, ctx.visual_counts)):
            return Selection.unchanged()
        return Selection([r.keep for r in results])

    def record(self, ctx, results: list[VideoResult]) -> None:
        """``trace.method("vidcom2")``: per sample the per-frame k_t, s_t, p_t, u_t and sum k_t."""
        t = ctx.trace
        t.compute_dtype, t.channels = self.compute_dtype, [r.channels for r in results]
        t.frame_budget = [r.budget.tolist() for r in results]
        t.frame_share = [r.share.float().cpu() for r in results]
        t.frame_weight = [r.weight.float().cpu() for r in results]
        t.uniqueness = [r.uniqueness.float().cpu() for r in results]
        t.kept_count = [len(r.keep) for r in results]

    # -- FLOPs -----------------------------------------------------------------------------------
    def token_schedule(self, n_visual: int, num_layers: int, backbone=None) -> list[int]:
        """NOMINAL schedule (the measured one is the trace's ``visual_tokens_per_layer``): round(r N)
        visual tokens in every layer (the stage is before layer 0); sum_t k_t differs from it by the
        per-frame rounding and the min(1, .) clamp."""
        return [budget(n_visual, self.retention)] * num_layers
