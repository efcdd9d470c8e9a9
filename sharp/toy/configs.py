"""The toys' architectures, vocabulary and untrained models (what scripts/train_toy.py starts from)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch

from sharp.toy.prompts import question_text

TOY_BACKBONES = {"toy_llava_onevision": "llava_onevision", "toy_qwen2_vl": "qwen2_vl",  # name -> family
                 "toy_scenes_llava_onevision": "llava_onevision", "toy_scenes_qwen2_vl": "qwen2_vl"}
# name -> the synthetic benchmark (module of sharp.synthetic) it is trained and scored on
TOY_BENCHMARKS = {"toy_llava_onevision": "benchmark", "toy_qwen2_vl": "benchmark",
                  "toy_scenes_llava_onevision": "scenes", "toy_scenes_qwen2_vl": "scenes"}
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

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
        # no bos/eos in the model config (the word-level tokenizer's eos stops generation): Qwen2-VL's
        # text-config defaults (151643 / 151645) lie outside the 512-word vocabulary, which 5.x warns about
        "bos_token_id": None, "eos_token_id": None,
    },
}


def _deeper(config: dict, comment: str, layers: int = 8, hidden: int = 64, heads: int = 2, **vision) -> dict:
    """A copy of a toy config with ``layers`` decoder layers of width ``hidden`` (``heads`` heads of
    32, half as many KV heads, FFN 2 x hidden) and other vision settings."""
    out = copy.deepcopy(config)
    out["_comment"] = comment
    out["text_config"].update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    out["vision_config"].update(vision)
    return out


# The toys of the multi-scene benchmark (sharp.synthetic.scenes, 168x168 videos, 32 frames): twice the
# depth, 512 / 576 visual tokens.
_SCENES_LLAVA_CONFIG = _deeper(_LLAVA_CONFIG, (
    "Trained toy LLaVA-OneVision of the scenes benchmark (scripts/train_toy.py): SigLIP 112 px / patch 14 -> 8x8 "
    "patches, 2x2 pooled to 4x4 = 16 tokens per frame (512 for 32 frames); Qwen2 LM 8 layers, hidden 64, 2 heads "
    "(1 KV head); word-level tokenizer (backbone.json)."),
    image_size=112)
_SCENES_QWEN_CONFIG = _deeper(_QWEN_CONFIG, (
    "Trained toy Qwen2-VL of the scenes benchmark (scripts/train_toy.py): patch 14, merge 2, temporal patch 2; the "
    "168x168 videos -> 6x6 = 36 tokens per temporal patch (576 for 32 frames); Qwen2 LM 8 layers, hidden 64, "
    "2 heads of 32 (1 KV head), mrope_section [4, 6, 6]; word-level tokenizer (backbone.json)."),
    hidden_size=64)

_TOY_CONFIGS = {"toy_llava_onevision": _LLAVA_CONFIG, "toy_qwen2_vl": _QWEN_CONFIG,
                "toy_scenes_llava_onevision": _SCENES_LLAVA_CONFIG, "toy_scenes_qwen2_vl": _SCENES_QWEN_CONFIG}


def toy_benchmark(name: str):
    """The synthetic benchmark module (``ensure_split``, ``generate_docs``, ``QTYPES``...) a backbone is
    scored on: :mod:`sharp.synthetic.scenes` for the scenes toys, :mod:`sharp.synthetic.benchmark` for
    every other backbone."""
    import importlib

    return importlib.import_module(f"sharp.synthetic.{TOY_BENCHMARKS.get(name, 'benchmark')}")


def toy_kind(name: str) -> str:
    """The backbone family of a toy."""
    if name not in TOY_BACKBONES:
        raise ValueError(f"unknown toy backbone {name!r}; valid: {', '.join(TOY_BACKBONES)}")
    return TOY_BACKBONES[name]


def toy_config(name: str) -> dict:
    """The config.json (dict) of a toy backbone, as trained by scripts/train_toy.py."""
    toy_kind(name)
    return copy.deepcopy(_TOY_CONFIGS[name])


def toy_words(name: str = "toy_llava_onevision") -> list[str]:
    """A toy's word vocabulary: every word piece (GPT-2 pre-tokenization, ByteLevel alphabet) of the
    chat templates and of its benchmark's prompts (:func:`toy_benchmark`); each is one token (others: bytes)."""
    import re

    from tokenizers import pre_tokenizers

    texts = ["You are a helpful assistant.", "system\nuser\nassistant\n"]
    texts += [question_text(d) for d in toy_benchmark(name).generate_docs("train", 200)]
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = {piece for t in texts for line in re.split(r"<[^>]+>", t) for piece, _ in split.pre_tokenize_str(line)}
    return sorted(w for w in words if len(w) > 1)


def build_untrained(name: str, config: Optional[dict] = None, seed: int = 0, num_frames: int = 32,
                    words: Optional[Sequence[str]] = None):
    """A freshly initialised (seeded) toy :class:`~sharp.backbones.Backbone` for training."""
    from sharp.backbones import family_class

    cls = family_class(toy_kind(name))
    cfg = cls.build_config(config or toy_config(name), "sdpa")
    torch.manual_seed(seed)
    model = cls.model_class()(cfg).float()
    tokenizer = cls.make_tokenizer(cfg, toy_words(name) if words is None else words, name)
    return cls(name=name, model=model, tokenizer=tokenizer, num_frames=num_frames)
