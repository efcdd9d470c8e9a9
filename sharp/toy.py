"""Toy video LLMs trained on the synthetic benchmark: shared helpers.

The toy backbones ``toy_llava_onevision`` and ``toy_qwen2_vl`` are the two real HF architectures
(``LlavaOnevisionForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``) at toy size
(4 decoder layers, hidden 128, about 0.9 M parameters), trained by ``scripts/train_toy.py`` on the
train split of :mod:`sharp.synthetic` and shipped in ``sharp/weights/<name>/`` (``backbone.json``
with the word vocabulary, ``config.json``, ``model.safetensors``, ``metadata.json``), where
:func:`sharp.load_backbone` finds them.

This module holds what training, evaluation (``scripts/retention_curve.py``) and the tests share:

* :func:`toy_config`: the architecture of each toy; :func:`toy_words`: its vocabulary (one token
  per word of the chat template and the benchmark's prompts, bytes for anything else);
* :func:`question_text` / :func:`answer_text`: prompt and target exactly as the lmms-eval task
  ``sharp_synthetic`` asks and scores them;
* :class:`PixelStore` / :func:`cached_pixels`: the videos of a split decoded once, sampled and
  preprocessed by the backbone's own pipeline (``Backbone.prepare``: same frames, same pixels),
  stored losslessly as uint8 in a cache folder;
* :func:`make_batch`: teacher-forced batches; :func:`visual_token_labels`: the training-only
  per-token targets of the visual probe;
* :func:`evaluate`: accuracy of greedy generation through ``sharp.prune`` for one method and
  retention, per question type, with the kept-token counts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

TOY_BACKBONES = {"toy_llava_onevision": "llava_onevision", "toy_qwen2_vl": "qwen2_vl"}
WEIGHTS_DIR = Path(__file__).parent / "weights"
ANSWER_END = "<|im_end|>"  # the toy answers "<letter><|im_end|>" (eos), then generation stops
CACHE_VERSION = 2  # bump when the stored pixel format changes

# -- architectures ----------------------------------------------------------------------------

_LLAVA_CONFIG = {
    "_comment": ("Trained toy LLaVA-OneVision (scripts/train_toy.py): SigLIP 56 px / patch 14 -> 4x4 patches, "
                 "2x2 pooled to 2x2 = 4 tokens per frame (128 for 32 frames); Qwen2 LM 4 layers, hidden 128; "
                 "word-level tokenizer (backbone.json)."),
    "model_type": "llava_onevision",
    "image_token_index": 259,
    "video_token_index": 260,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "vision_use_head": False,
    },
    "text_config": {
        "model_type": "qwen2",
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
    },
}

_QWEN_CONFIG = {
    "_comment": ("Trained toy Qwen2-VL (scripts/train_toy.py): patch 14, merge 2, temporal patch 2; the 96x96 "
                 "synthetic videos are resized to 84x84 -> 3x3 = 9 tokens per temporal patch (144 for 32 frames); "
                 "Qwen2 LM 4 layers, hidden 128, head_dim 32, mrope_section [4, 6, 6]; word-level tokenizer (backbone.json)."),
    "model_type": "qwen2_vl",
    "image_token_id": 263,
    "video_token_id": 264,
    "vision_start_token_id": 261,
    "vision_end_token_id": 262,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 2, "embed_dim": 64, "hidden_size": 128, "hidden_act": "quick_gelu", "mlp_ratio": 2,
        "num_heads": 2, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "text_config": {
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": False,
    },
}


def toy_kind(name: str) -> str:
    if name not in TOY_BACKBONES:
        raise ValueError(f"unknown toy backbone {name!r}; valid: {', '.join(TOY_BACKBONES)}")
    return TOY_BACKBONES[name]


def toy_config(name: str) -> dict:
    """The config.json (dict) of a toy backbone, as trained by scripts/train_toy.py."""
    return copy.deepcopy(_LLAVA_CONFIG if toy_kind(name) == "llava_onevision" else _QWEN_CONFIG)


def toy_words() -> list[str]:
    """The toys' word vocabulary: every word piece (GPT-2 pre-tokenization, ByteLevel alphabet) of the
    chat templates and of the synthetic benchmark's prompts; each is one token (others: bytes)."""
    import re

    from tokenizers import pre_tokenizers

    from sharp.synthetic import generate_docs

    texts = ["You are a helpful assistant.", "system\nuser\nassistant\n"]
    texts += [question_text(d) for d in generate_docs("train", 200)]
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = {piece for t in texts for line in re.split(r"<[^>]+>", t) for piece, _ in split.pre_tokenize_str(line)}
    return sorted(w for w in words if len(w) > 1)


def build_untrained(name: str, config: Optional[dict] = None, seed: int = 0, num_frames: int = 32,
                    words: Optional[Sequence[str]] = None):
    """A freshly initialised (seeded) toy :class:`~sharp.backbones.Backbone` for training."""
    import tempfile

    from sharp.backbones import Backbone, _build_config, _byte_tokenizer, _model_class, _special_ids

    kind = toy_kind(name)
    config = config or toy_config(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        cfg = _build_config(kind, path, "sdpa")
    torch.manual_seed(seed)
    model = _model_class(kind)(cfg).float()
    words = toy_words() if words is None else words
    tokenizer = _byte_tokenizer(_special_ids(kind, cfg), words)
    if len(tokenizer) > cfg.text_config.vocab_size:
        raise ValueError(f"{len(tokenizer)} tokens do not fit vocab_size {cfg.text_config.vocab_size}")
    return Backbone(name=name, kind=kind, model=model, tokenizer=tokenizer, num_frames=num_frames)


# -- prompts ----------------------------------------------------------------------------------


def question_text(doc: dict) -> str:
    """The user text of a doc, exactly as the lmms-eval task ``sharp_synthetic`` builds it."""
    from sharp.synthetic.benchmark import ANSWER_INSTRUCTION, format_prompt

    return format_prompt(doc["question"], doc["options"], pre_prompt="", post_prompt=ANSWER_INSTRUCTION)


def answer_text(doc: dict) -> str:
    """What the toy is trained to answer: the option letter (then ``<|im_end|>``)."""
    return doc["answer"]


# -- cached preprocessing ---------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SHARP_CACHE/toy`` if ``SHARP_CACHE`` is set, else ``~/.cache/sharp/toy``."""
    root = os.environ.get("SHARP_CACHE")
    return (Path(root).expanduser() if root else Path("~/.cache/sharp").expanduser()) / "toy"


def _vision_key(bb) -> dict:
    vc = bb.config.vision_config
    if bb.kind == "llava_onevision":
        vis = {"image_size": vc.image_size, "patch_size": vc.patch_size}
    else:
        vis = {"patch_size": vc.patch_size, "merge": vc.spatial_merge_size, "temporal": vc.temporal_patch_size}
    return {"kind": bb.kind, "num_frames": bb.num_frames, "video_kwargs": bb.video_kwargs, **vis}


def _norm_constants(bb, shape) -> tuple[np.ndarray, np.ndarray]:
    """Per-element float32 mean and std broadcastable to one sample's pixel tensor."""
    from sharp import video as V

    if bb.kind == "llava_onevision":  # (T, 3, S, S)
        mean = np.asarray(V.SIGLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(V.SIGLIP_STD, np.float32).reshape(1, 3, 1, 1)
    else:  # (N, 3 * tps * p * p), channel-major columns
        per = shape[1] // 3
        mean = np.repeat(np.asarray(V.OPENAI_CLIP_MEAN, np.float32), per).reshape(1, -1)
        std = np.repeat(np.asarray(V.OPENAI_CLIP_STD, np.float32), per).reshape(1, -1)
    return mean, std


def _u8_to_pixels(u8, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """The processors' rescale/normalize (float64 * 1/255 -> float32, then (x - mean) / std)."""
    u8 = u8.numpy() if isinstance(u8, torch.Tensor) else u8
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))


def _pixels_to_u8(pixels: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = pixels.numpy().astype(np.float64) * std + mean
    return torch.from_numpy(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))


def video_pixels(bb, video) -> dict:
    """Pixel inputs of one video, exactly as ``bb.prepare(video, question)`` computes them.

    Returns ``{"pixel_values_videos": ...}`` for one sample (LLaVA-OV: (T, 3, S, S); Qwen2-VL:
    (N, D)) plus ``video_grid_thw`` (1, 3) for Qwen2-VL.
    """
    inputs = bb.prepare(video, "")
    if bb.kind == "llava_onevision":
        return {"pixel_values_videos": inputs["pixel_values_videos"][0].cpu().float()}
    return {"pixel_values_videos": inputs["pixel_values_videos"].cpu().float(),
            "video_grid_thw": inputs["video_grid_thw"].cpu()}


@dataclass
class PixelStore:
    """Preprocessed videos of a list of docs, stored losslessly as uint8 (see :func:`cached_pixels`)."""

    kind: str
    u8: list  # per doc: uint8 tensor, same shape as the pixel tensor
    thw: list  # per doc: (1, 3) LongTensor (Qwen2-VL) or None
    mean: np.ndarray = field(repr=False, default=None)
    std: np.ndarray = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.u8)

    def pixels(self, i: int) -> dict:
        out = {"pixel_values_videos": _u8_to_pixels(self.u8[i], self.mean, self.std)}
        if self.thw[i] is not None:
            out["video_grid_thw"] = self.thw[i]
        return out


def cached_pixels(bb, docs: Sequence[dict], cache_dir=None, verbose: bool = False) -> PixelStore:
    """Decode + preprocess the videos of ``docs`` once (backbone pipeline), cached in ``cache_dir``.

    The cache file is keyed by the backbone's video settings (kind, frames, resolution, patching)
    and the docs (ids and video file sizes); values are the exact pixel tensors of
    ``Backbone.prepare`` (stored as uint8 and checked to reconstruct bit-identically).
    """
    from sharp.synthetic.benchmark import FORMAT_VERSION

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ident = {"v": CACHE_VERSION, "bench": FORMAT_VERSION, "vision": _vision_key(bb),
             "docs": [(d["id"], os.path.getsize(d["video"])) for d in docs]}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"{bb.kind}-{len(docs)}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=False)
            mean, std = _norm_constants(bb, blob["u8"][0].shape)
            return PixelStore(bb.kind, blob["u8"], blob["thw"], mean, std)
        except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt
            pass
    t0 = time.time()
    u8s, thws = [], []
    mean = std = None
    for i, doc in enumerate(docs):
        px = video_pixels(bb, doc["video"])
        pv = px["pixel_values_videos"]
        if mean is None:
            mean, std = _norm_constants(bb, pv.shape)
        u8 = _pixels_to_u8(pv, mean, std)
        if not torch.equal(_u8_to_pixels(u8, mean, std), pv):
            raise RuntimeError(f"pixel cache: {doc['video']} does not reconstruct exactly from uint8")
        u8s.append(u8)
        thws.append(px.get("video_grid_thw"))
        if verbose and (i + 1) % 250 == 0:
            print(f"  preprocessed {i + 1}/{len(docs)} videos ({time.time() - t0:.0f} s)", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ident": ident, "u8": u8s, "thw": thws}, tmp)
    os.replace(tmp, path)
    return PixelStore(bb.kind, u8s, thws, mean, std)


# -- batches ----------------------------------------------------------------------------------


def make_batch(bb, docs: Sequence[dict], store: PixelStore, indices: Sequence[int],
               with_answer: bool = False) -> dict:
    """Model inputs for docs ``indices`` (left-padded); with ``with_answer`` the prompt ends with the
    answer (letter + ``<|im_end|>``) and ``n_answer_tokens`` says how many trailing tokens to score."""
    pxs = [store.pixels(i) for i in indices]
    texts = []
    for i, px in zip(indices, pxs):
        prompt = bb.build_prompt(question_text(docs[i]), bb.n_placeholders(**px))
        texts.append(prompt + (answer_text(docs[i]) + ANSWER_END if with_answer else ""))
    out = bb._tokenize(texts)
    if bb.kind == "llava_onevision":
        out["pixel_values_videos"] = torch.stack([px["pixel_values_videos"] for px in pxs])
    else:
        out["pixel_values_videos"] = torch.cat([px["pixel_values_videos"] for px in pxs])
        out["video_grid_thw"] = torch.cat([px["video_grid_thw"] for px in pxs])
    out = bb._to_model(out)
    if with_answer:
        n_ans = {len(bb.tokenizer(answer_text(docs[i]) + ANSWER_END, add_special_tokens=False)["input_ids"])
                 for i in indices}
        if len(n_ans) != 1:
            raise ValueError("answers of one batch must have the same token count")
        out["n_answer_tokens"] = n_ans.pop()
    return out


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class EvalResult:
    method: str
    retention: float
    n: int
    accuracy: float  # percent
    per_qtype: dict  # qtype -> percent
    n_visual: int
    kept_tokens: float  # mean visual tokens kept after the last stage (n_visual without pruning)
    kept_counts: list  # per doc
    preds: list  # per doc: predicted letter ('' if none)
    answers: list
    seconds: float


def evaluate(bb, docs: Sequence[dict], method: str = "vanilla", retention: float = 1.0,
             store: Optional[PixelStore] = None, batch_size: int = 1, max_new_tokens: int = 4,
             cache_dir=None, **method_kwargs) -> EvalResult:
    """Accuracy (%) of greedy generation of the answer letter through ``sharp.prune``.

    The answer is parsed with the lmms-eval task's own parser; ``batch_size`` 1 is what the harness
    runs (larger batches are left-padded: faster, equal up to float rounding).
    """
    import sharp
    from sharp.synthetic.lmms_task.utils import extract_letter  # the task's own answer parser

    store = store if store is not None else cached_pixels(bb, docs, cache_dir)
    t0 = time.time()
    preds, kept_counts, n_visual = [], [], 0
    bb.model.eval()
    for s in range(0, len(docs), batch_size):
        idx = list(range(s, min(s + batch_size, len(docs))))
        inputs = make_batch(bb, docs, store, idx)
        n_visual = bb.layout(inputs).n_visual
        with torch.no_grad(), sharp.prune(bb, method, retention, **method_kwargs) as trace:
            out = bb.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=bb.tokenizer.pad_token_id, eos_token_id=bb.tokenizer.eos_token_id)
        texts = bb.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
        for j, (i, text) in enumerate(zip(idx, texts)):
            text = text.split(ANSWER_END)[0].replace(bb.tokenizer.pad_token, "")
            preds.append(extract_letter(text, docs[i]["options"]))
            kept_counts.append(int(trace.kept[-1][j].numel()) if trace.kept else n_visual)
    answers = [d["answer"] for d in docs]
    right = [p == a for p, a in zip(preds, answers)]
    per = {}
    for d, r in zip(docs, right):
        per.setdefault(d["qtype"], []).append(r)
    return EvalResult(
        method=method, retention=float(retention), n=len(docs),
        accuracy=100.0 * sum(right) / max(1, len(right)),
        per_qtype={q: 100.0 * sum(v) / len(v) for q, v in per.items()},
        n_visual=n_visual, kept_tokens=float(np.mean(kept_counts)) if kept_counts else 0.0,
        kept_counts=kept_counts, preds=preds, answers=answers, seconds=time.time() - t0)


# -- auxiliary training targets ---------------------------------------------------------------

COLOR_IDS = {"red": 1, "green": 2, "blue": 3, "yellow": 4}  # 0: no object


def sampled_frames(bb, doc: dict) -> np.ndarray:
    """Indices (into the video file) of the frames the backbone samples, per visual-token frame.

    LLaVA-OV: one frame per visual frame; Qwen2-VL: (t, 2) pairs of each temporal patch.
    """
    from sharp import video as V

    total = int(doc["num_frames"])
    if bb.kind == "llava_onevision":
        return V.uniform_frame_indices(total, bb.num_frames)[:, None]
    idx = V.qwen2vl_frame_indices(total, float(doc["fps"]), max_num_frames=bb.num_frames)
    tps = bb.config.vision_config.temporal_patch_size
    if len(idx) % tps:
        idx = np.concatenate([idx, np.repeat(idx[-1:], tps - len(idx) % tps)])
    return idx.reshape(-1, tps)


def visual_token_labels(bb, doc: dict, grid: tuple[int, int]) -> dict:
    """Per visual token (layout order: frame, row, column): the colour of the object covering at least
    a quarter of its image cell (``color``, 0 = none), its frame index (``frame``) and the same for
    object tokens only (``oframe``: frame + 1, 0 = no object). Training-only targets."""
    frames = sampled_frames(bb, doc)  # (F, k)
    gh, gw = grid
    H, W = doc["height"], doc["width"]
    color = np.zeros((len(frames), gh, gw), np.int64)
    ys = np.arange(gh + 1) * H / gh
    xs = np.arange(gw + 1) * W / gw
    for e in doc["events"]:
        half = e["size"] / 2
        oy = np.clip(np.minimum(ys[1:], e["cy"] + half) - np.maximum(ys[:-1], e["cy"] - half), 0, None)
        ox = np.clip(np.minimum(xs[1:], e["cx"] + half) - np.maximum(xs[:-1], e["cx"] - half), 0, None)
        cover = (oy[:, None] * ox[None, :]) / ((H / gh) * (W / gw)) >= 0.25  # (gh, gw)
        present = ((frames >= e["start"]) & (frames < e["end"])).any(axis=1)  # (F,)
        m = present[:, None, None] & cover[None]
        color[m] = COLOR_IDS[e["color"]]
    frame = np.repeat(np.arange(len(frames)), gh * gw)
    color = color.reshape(-1)
    oframe = np.where(color > 0, frame + 1, 0)  # the frame of object tokens, 0 elsewhere
    return {"color": torch.from_numpy(color), "frame": torch.from_numpy(frame), "oframe": torch.from_numpy(oframe)}


def letter_accuracy(bb, docs: Sequence[dict], store: PixelStore, batch_size: int = 8) -> tuple[float, dict]:
    """Quick check without ``sharp.prune``: accuracy (%) of the argmax over the four letter tokens
    at the answer position (plain forward of the unpruned model), overall and per qtype."""
    letters = [bb.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    right, per = [], {}
    was_training = bb.model.training
    bb.model.eval()
    with torch.no_grad():
        for s in range(0, len(docs), batch_size):
            idx = list(range(s, min(s + batch_size, len(docs))))
            logits = bb.model(**make_batch(bb, docs, store, idx), use_cache=False).logits[:, -1, letters]
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                ok = "ABCD"[p] == docs[i]["answer"]
                right.append(ok)
                per.setdefault(docs[i]["qtype"], []).append(ok)
    bb.model.train(was_training)
    return 100.0 * sum(right) / max(1, len(right)), {q: 100.0 * sum(v) / len(v) for q, v in per.items()}
