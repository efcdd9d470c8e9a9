"""Accuracy of the toys: greedy generation through ``sharp.prune`` (:func:`evaluate`) and the quick
letter-argmax check used while training (:func:`letter_accuracy`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from sharp.toy.pixels import PixelStore, cached_pixels, make_batch
from sharp.toy.prompts import ANSWER_END


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
    layer_counts: list  # per doc: visual tokens each decoder layer processed (the measured schedule)
    preds: list  # per doc: predicted letter ('' if none)
    answers: list
    seconds: float


def _percent(right: Sequence[bool]) -> float:
    return 100.0 * sum(right) / max(1, len(right))


def _per_qtype(docs: Sequence[dict], right: Sequence[bool]) -> dict:
    per: dict = {}
    for d, r in zip(docs, right):
        per.setdefault(d["qtype"], []).append(r)
    return {q: 100.0 * sum(v) / len(v) for q, v in per.items()}


def _generate(bb, inputs: dict, method, max_new_tokens: int) -> tuple[list[str], Optional[list], list]:
    """Greedy answers (text up to ``<|im_end|>``, padding removed) of one batch with the resolved
    ``method``, the kept visual indices of the last stage per sample (None without pruning) and each
    sample's per-layer counts."""
    import sharp

    with torch.no_grad(), sharp.prune(bb, method) as trace:
        out = bb.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=bb.tokenizer.pad_token_id, eos_token_id=bb.tokenizer.eos_token_id)
    texts = bb.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    texts = [t.split(ANSWER_END)[0].replace(bb.tokenizer.pad_token, "") for t in texts]
    per_sample = [list(column) for column in zip(*trace.visual_tokens_by_sample)]
    return texts, (trace.kept[-1] if trace.kept else None), per_sample


def evaluate(bb, docs: Sequence[dict], method: str = "vanilla", retention: float = 1.0,
             store: Optional[PixelStore] = None, batch_size: int = 1, max_new_tokens: int = 4,
             cache_dir=None, **method_kwargs) -> EvalResult:
    """Accuracy (%) of greedy generation of the answer letter through ``sharp.prune``.

    The answer is parsed with the lmms-eval task's own parser; ``batch_size`` 1 is what the harness
    runs (larger batches are left-padded: faster, equal up to float rounding). ``method`` (a name or an
    instance) is resolved for ``bb`` once (``sharp.resolve_method``), as ``run.py`` does.
    """
    import sharp
    from sharp.synthetic.lmms_task.utils import extract_letter  # the task's own answer parser

    name = method if isinstance(method, str) else getattr(method, "label", None) or method.name
    method = sharp.resolve_method(method, bb, retention, **method_kwargs).method

    store = store if store is not None else cached_pixels(bb, docs, cache_dir)
    t0 = time.time()
    preds, kept_counts, layer_counts, n_visual = [], [], [], 0
    bb.model.eval()
    for s in range(0, len(docs), batch_size):
        idx = list(range(s, min(s + batch_size, len(docs))))
        inputs = make_batch(bb, docs, store, idx)
        n_visual = bb.layout(inputs).n_visual
        texts, kept, per_layer = _generate(bb, inputs, method, max_new_tokens)
        layer_counts += per_layer
        preds += [extract_letter(text, docs[i]["options"]) for i, text in zip(idx, texts)]
        kept_counts += [int(kept[j].numel()) if kept is not None else n_visual for j in range(len(idx))]
    answers = [d["answer"] for d in docs]
    right = [p == a for p, a in zip(preds, answers)]
    return EvalResult(
        method=name, retention=float(retention), n=len(docs), accuracy=_percent(right),
        per_qtype=_per_qtype(docs, right), n_visual=n_visual,
        kept_tokens=float(np.mean(kept_counts)) if kept_counts else 0.0,
        kept_counts=kept_counts, layer_counts=layer_counts, preds=preds, answers=answers, seconds=time.time() - t0)


def letter_accuracy(bb, docs: Sequence[dict], store: PixelStore, batch_size: int = 8) -> tuple[float, dict]:
    """Quick check without ``sharp.prune``: accuracy (%) of the argmax over the four letter tokens
    at the answer position (plain forward of the unpruned model), overall and per qtype."""
    letters = [bb.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    right = []
    was_training = bb.model.training
    bb.model.eval()
    with torch.no_grad():
        for s in range(0, len(docs), batch_size):
            idx = list(range(s, min(s + batch_size, len(docs))))
            logits = bb.model(**make_batch(bb, docs, store, idx), use_cache=False).logits[:, -1, letters]
            right += ["ABCD"[p] == docs[i]["answer"] for i, p in zip(idx, logits.argmax(-1).tolist())]
    bb.model.train(was_training)
    return _percent(right), _per_qtype(docs, right)
