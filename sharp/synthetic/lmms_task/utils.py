"""lmms-eval hooks of the tasks of both synthetic benchmarks: ``sharp_synthetic`` /
``sharp_synthetic_default`` (:mod:`sharp.synthetic.benchmark`) and ``sharp_scenes`` /
``sharp_scenes_default`` (:mod:`sharp.synthetic.scenes`). Both ask the same prompt
(:func:`~sharp.synthetic.benchmark.format_prompt`) and are scored by the same parser; a stub row's
``benchmark`` field (absent: the first benchmark) says which generator builds its docs.

lmms-eval loads this file by path (``!function utils.x``), so ``sharp`` is imported
absolutely, with the repository root added to ``sys.path`` when the package is not
installed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

try:
    from sharp.synthetic import benchmark as _bench, scenes as _scenes
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from sharp.synthetic import benchmark as _bench, scenes as _scenes

LETTERS = _bench.LETTERS
N_ENV = "SHARP_SYNTHETIC_N"  # overrides `n` of the non-"default" stub rows (both benchmarks)
# stub row's `benchmark` -> the generator of its docs
GENERATORS = {"synthetic": _bench, _scenes.NAME: _scenes}


def sharp_synthetic_process_docs(dataset):
    """Replace the stub rows (``benchmark`` (default "synthetic"), ``split``, ``n``, ``seed``) by the
    generated docs."""
    import datasets

    docs = []
    for row in dataset:
        name = row.get("benchmark") or "synthetic"
        if name not in GENERATORS:
            raise ValueError(f"stub row benchmark={name!r}; accepted values: {', '.join(GENERATORS)}")
        split, n, seed = row["split"], int(row["n"]), int(row.get("seed") or 0)
        if split != "default" and os.environ.get(N_ENV):
            n = int(os.environ[N_ENV])
        docs.extend(GENERATORS[name].ensure_split(split, n=n, seed=seed))
    return datasets.Dataset.from_list(docs)


def sharp_synthetic_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    path = doc["video"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synthetic video {path} is missing (cache removed after the task was built?)")
    return [path]


def sharp_synthetic_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    pre = kw.get("pre_prompt", "") or ""
    post = kw.get("post_prompt", _bench.ANSWER_INSTRUCTION)
    return _bench.format_prompt(doc["question"], doc["options"], pre_prompt=pre, post_prompt=post or "")


_THINK = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.IGNORECASE | re.DOTALL)
_LEAD = re.compile(r"^[\s\"'`*_#>\[\(]*(?:the\s+)?(?:correct\s+|best\s+|final\s+)?(?:answer|option|choice)?\s*(?:is|:)?\s*[\s\"'`*_\[\(]*([A-D])(?![A-Za-z])", re.IGNORECASE)
_MARKED = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[\s\"'`*_\[\(]*([A-D])(?![A-Za-z])", re.IGNORECASE)
_BARE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


def extract_letter(text: str, options=None) -> str:
    """First option letter (A-D) of a model answer, '' when none is found.

    Handles "B", "B.", "(B)", "B) red", "**B**", "Answer: B", "The answer is (C)";
    a reply that spells out exactly one option text is mapped to its letter."""
    if not isinstance(text, str):
        return ""
    s = _THINK.sub(" ", text).strip()
    if not s:
        return ""
    m = _LEAD.match(s)
    if m:
        return m.group(1).upper()
    m = _MARKED.search(s)
    if m:
        return m.group(1).upper()
    if options:
        low = s.lower()
        hits = [i for i, opt in enumerate(options) if str(opt).lower().strip(" .") in low]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    m = _BARE.search(s)  # upper-case only: never the article "a"
    if m and m.group(1).isupper():
        return m.group(1)
    return ""


def sharp_synthetic_process_results(doc, results):
    pred = results[0] if results else ""
    if not isinstance(pred, str):  # GenerationResult or similar
        pred = getattr(pred, "text", str(pred))
    letter = extract_letter(pred, doc.get("options"))
    item = {
        "id": doc["id"],
        "qtype": doc["qtype"],
        "subtype": doc.get("subtype", ""),
        "pred": letter,
        "answer": doc["answer"],
        "score": 100.0 if letter == doc["answer"] else 0.0,
    }
    return {"accuracy": item, f"accuracy_{doc['qtype']}": item}


def sharp_synthetic_aggregate(results):
    """Mean score (0-100) over the items of this metric."""
    if not results:
        return float("nan")
    return sum(float(r["score"]) for r in results) / len(results)
