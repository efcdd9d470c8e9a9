"""Prompt and target of a synthetic-benchmark doc, exactly as the lmms-eval task ``sharp_synthetic``
asks and scores them."""
from __future__ import annotations

ANSWER_END = "<|im_end|>"  # the toy answers "<letter><|im_end|>" (eos), then generation stops


def question_text(doc: dict) -> str:
    """The user text of a doc, exactly as the lmms-eval task ``sharp_synthetic`` builds it."""
    from sharp.synthetic.benchmark import ANSWER_INSTRUCTION, format_prompt

    return format_prompt(doc["question"], doc["options"], pre_prompt="", post_prompt=ANSWER_INSTRUCTION)


def answer_text(doc: dict) -> str:
    """What the toy is trained to answer: the option letter (then ``<|im_end|>``)."""
    return doc["answer"]
