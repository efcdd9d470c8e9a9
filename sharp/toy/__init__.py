"""Toy video LLMs trained on the synthetic benchmark: shared helpers.

The toy backbones ``toy_llava_onevision`` and ``toy_qwen2_vl`` are the two real HF architectures
(``LlavaOnevisionForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``) at toy size
(4 decoder layers, hidden 128, about 0.9 M parameters), trained by ``scripts/train_toy.py`` (the
command line of :mod:`sharp.toy.training`) on the train split of :mod:`sharp.synthetic` and shipped in
``sharp/weights/<name>/`` (``backbone.json`` with the word vocabulary, ``config.json``,
``model.safetensors``, ``metadata.json``), where :func:`sharp.load_backbone` finds them.

This package holds the toys' training and what training, evaluation (``scripts/retention_curve.py``)
and the tests share; everything family-specific is asked of the backbone's family class
(``sharp.backbones``):

* ``configs``: :func:`toy_config`, the architecture of each toy; :func:`toy_words`, its vocabulary
  (one token per word of the chat template and the benchmark's prompts, bytes for anything else);
  :func:`build_untrained`;
* ``prompts``: :func:`question_text` / :func:`answer_text`, prompt and target exactly as the
  lmms-eval task ``sharp_synthetic`` asks and scores them;
* ``pixels``: :class:`PixelStore` / :func:`cached_pixels`, the videos of a split decoded once,
  sampled and preprocessed by the backbone's own pipeline (``Backbone.prepare``: same frames, same
  pixels), stored losslessly as uint8 in a cache folder; :func:`make_batch`, teacher-forced batches;
* ``labels``: :func:`visual_token_labels`, the training-only per-token targets of the visual probe;
* ``evaluation``: :func:`evaluate`, accuracy of greedy generation through ``sharp.prune`` for one
  method and retention, per question type, with the kept-token counts;
* ``probes`` (not imported here): :class:`~sharp.toy.probes.TokenProbe` and the question probe, the
  training-only heads whose losses give the first layers a dense signal;
* ``training`` (not imported here): the shipped settings (``DEFAULTS``), the training loop,
  :func:`~sharp.toy.training.train_one` and the command line :func:`~sharp.toy.training.main`.
"""
from sharp.toy.configs import (TOY_BACKBONES, TOY_BENCHMARKS, WEIGHTS_DIR, build_untrained, toy_benchmark, toy_config,
                               toy_kind, toy_words)
from sharp.toy.evaluation import EvalResult, evaluate, letter_accuracy
from sharp.toy.labels import COLOR_IDS, sampled_frames, visual_token_labels
from sharp.toy.pixels import CACHE_VERSION, PixelStore, cached_pixels, default_cache_dir, make_batch, video_pixels
from sharp.toy.prompts import ANSWER_END, answer_text, question_text

__all__ = [
    "TOY_BACKBONES", "TOY_BENCHMARKS", "toy_benchmark", "WEIGHTS_DIR", "ANSWER_END", "CACHE_VERSION", "COLOR_IDS",
    "toy_kind", "toy_config", "toy_words", "build_untrained", "question_text", "answer_text",
    "default_cache_dir", "video_pixels", "PixelStore", "cached_pixels", "make_batch",
    "EvalResult", "evaluate", "letter_accuracy", "sampled_frames", "visual_token_labels",
]
