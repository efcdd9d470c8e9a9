"""Backbones: unmodified HF video LLMs plus the visual-token layout of their inputs.

`load_backbone(name)` returns an instance of the backbone's family class (a :class:`Backbone`
subclass registered with :func:`register_family`: ``LlavaOneVisionBackbone`` in
``llava_onevision.py``, ``Qwen2VLBackbone`` in ``qwen2_vl.py``) whose ``.model`` is a plain HF model
(``LlavaOnevisionForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``). Pruning never
edits the model; :func:`sharp.prune` attaches hooks for the duration of a ``with`` block.

This module holds what every family shares: :class:`VisualLayout`, the :class:`Backbone` base
class, the family registry, the table of named backbones and :func:`load_backbone`. See
``docs/backbones.md``.
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch

from sharp.backbones import compat
from sharp.backbones.tokenizer import assign_special_ids, byte_tokenizer
from sharp.backbones.vision import (ATTENTION_BUDGET, CPU_ATTENTION_BUDGET, FramePooling, RopeFn, VisionMaps, captured_input,
                                    captured_output, received_attention)

_CONFIG_DIR = Path(__file__).parent / "model_configs"

# name -> family, hub checkpoint (or None), config json (in model_configs/ or absolute), default dtype
# [, video_kwargs]. A family module may add rows with register_backbone().
_BACKBONES: dict[str, dict[str, Any]] = {
    "llava_onevision_7b": dict(family="llava_onevision", hub="llava-hf/llava-onevision-qwen2-7b-ov-hf",
                               config="llava_onevision_7b.json", dtype=torch.bfloat16),
    "qwen2_vl_7b": dict(family="qwen2_vl", hub="Qwen/Qwen2-VL-7B-Instruct",
                        config="qwen2_vl_7b.json", dtype=torch.bfloat16),
    "tiny_llava_onevision": dict(family="llava_onevision", hub=None, config="tiny_llava_onevision.json",
                                 dtype=torch.float32),
    "tiny_qwen2_vl": dict(family="qwen2_vl", hub=None, config="tiny_qwen2_vl.json", dtype=torch.float32,
                          video_kwargs=dict(max_pixels=112 * 112)),
    # mid-size random-weight configs: seconds per prefill on CPU (latency benchmarks)
    "mid_llava_onevision": dict(family="llava_onevision", hub=None, config="mid_llava_onevision.json",
                                dtype=torch.float32),
    "mid_qwen2_vl": dict(family="qwen2_vl", hub=None, config="mid_qwen2_vl.json", dtype=torch.float32),
}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# family name -> Backbone subclass (filled by @register_family when sharp.backbones is imported)
FAMILIES: dict[str, type["Backbone"]] = {}


def register_family(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: make ``cls`` the backbone class of family ``cls.family``."""
    if not cls.family:
        raise ValueError(f"{cls.__name__}: set the class attribute `family` before registering it")
    if cls.family in FAMILIES and FAMILIES[cls.family] is not cls:
        raise ValueError(f"backbone family {cls.family!r} is already registered by {FAMILIES[cls.family].__name__}")
    FAMILIES[cls.family] = cls
    return cls


def register_backbone(name: str, *, family: str, config: str, hub: Optional[str] = None,
                      dtype: torch.dtype = torch.float32, **extra) -> None:
    """Add a named backbone (e.g. from a new family's module); ``config`` is a file name in
    ``sharp/backbones/model_configs`` or an absolute path."""
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is already defined")
    _BACKBONES[name] = dict(family=family, hub=hub, config=config, dtype=dtype, **extra)


def family_class(family: str) -> type["Backbone"]:
    """The registered :class:`Backbone` subclass of a family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; registered: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def backbone_names() -> list[str]:
    return sorted(_BACKBONES) + sorted(n for n in _extra_backbones() if n not in _BACKBONES)


def backbone_family(name: str) -> str:
    """The family of a named backbone (e.g. ``"llava_onevision"`` for ``toy_llava_onevision``),
    without building it."""
    return _resolve_spec(name)["family"]


def backbone_config_path(name: str) -> Path:
    """The config.json of a named backbone (its architecture), without building it."""
    return _config_path(_resolve_spec(name))


def _extra_backbones() -> dict[str, dict[str, Any]]:
    """Backbones with shipped trained weights (sharp/weights/<name>/), e.g. the toy models."""
    root = Path(__file__).resolve().parents[1] / "weights"
    if not root.is_dir():
        return {}
    return {d.name: _weights_spec(d) for d in sorted(root.iterdir()) if (d / "backbone.json").is_file()}


def _weights_spec(d: Path) -> dict[str, Any]:
    """The spec of a trained-weights folder: backbone.json (``kind`` = family, word vocabulary),
    config.json and model.safetensors (float32)."""
    info = json.loads((d / "backbone.json").read_text())
    return dict(family=info["kind"], hub=None, config=str(d / "config.json"), dtype=torch.float32,
                weights=str(d), words=info.get("words", ()))


def _resolve_spec(name: str, weights_dir: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
    """The spec of a named backbone; with ``weights_dir``, that of another copy of its weights."""
    specs = {**_BACKBONES, **_extra_backbones()}
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(specs))}")
    if weights_dir is None:
        return specs[name]
    if not specs[name].get("weights"):
        raise ValueError(f"weights_dir is for trained-weights backbones ({', '.join(sorted(_extra_backbones()))}), "
                         f"not {name!r}")
    d = Path(weights_dir)
    d = d / name if (d / name / "backbone.json").is_file() else d
    if not (d / "backbone.json").is_file():
        raise FileNotFoundError(f"{d}: no backbone.json (expected backbone.json, config.json, model.safetensors)")
    return _weights_spec(d)


def _config_path(spec: dict[str, Any]) -> Path:
    return Path(spec["config"]) if os.path.isabs(spec["config"]) else _CONFIG_DIR / spec["config"]


@dataclass(frozen=True)
class VisualLayout:
    """Where the visual tokens of one input are (identical for every sample of a batch).

    n_visual: visual tokens per sample (LLaVA-OV: frames x 196; its single trailing image_newline
        token is treated as text). Qwen2-VL: t x h x w / 4.
    frames: LLaVA-OV frames; Qwen2-VL temporal patches (2 frames each).
    tokens_per_frame: tokens of one frame / temporal patch; grid: its (h, w) token grid.
    """

    n_visual: int
    frames: int
    tokens_per_frame: int
    grid: tuple[int, int]

    def frame_of(self, visual_index: torch.Tensor) -> torch.Tensor:
        return visual_index // self.tokens_per_frame


# Prompt formats of lmms-eval 0.7.3's built-in wrappers (the paper's numbers came from these):
# both are ChatML with the system turn "You are a helpful assistant."; the family classes place the
# video in the user turn.
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@dataclass
class Backbone(abc.ABC):
    """An unmodified HF video LLM plus what the engine needs to know about its inputs.

    One subclass per model family (``@register_family``) implements the family-specific parts:
    config/model classes, special tokens, prompt, preprocessing, layout and vision-tower access.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    num_frames: int = 32  # frames sampled per video by prepare()
    video_kwargs: dict = field(default_factory=dict)
    # weights loaded from a hub checkpoint (load_pretrained), not built random / from the toy weights:
    # side weights a method needs (FastVID's SigLIP pooling head) then come from the hub too
    pretrained: bool = False

    family: ClassVar[str] = ""  # "llava_onevision" | "qwen2_vl" | ...
    # a separator token appended after each video's visual tokens (LLaVA-OV's image_newline), which the
    # engine treats as text; StageContext.newline_position finds it in a pruned sequence
    video_newline: ClassVar[bool] = False
    # Most float32 attention-logit elements vision_maps holds at once (see sharp.backbones.vision; on a
    # CPU at most CPU_ATTENTION_BUDGET, a cache-sized group).
    attention_budget: ClassVar[int] = ATTENTION_BUDGET

    def __post_init__(self):
        compat.adapt_model(self.model)  # transformers 5.x runs as 4.57 (sharp/backbones/compat.py)

    @property
    def kind(self) -> str:
        """The family name (kept for older code: ``bb.kind == "llava_onevision"``)."""
        return self.family

    # -- the HF classes (family) -----------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def config_class(cls) -> type:
        """The HF config class (e.g. ``LlavaOnevisionConfig``)."""

    @classmethod
    @abc.abstractmethod
    def model_class(cls) -> type:
        """The HF model class (e.g. ``LlavaOnevisionForConditionalGeneration``)."""

    @classmethod
    @abc.abstractmethod
    def config_special_ids(cls, config) -> dict[str, int]:
        """The special tokens whose ids the model config fixes (image/video placeholders, ...)."""

    @classmethod
    def build_config(cls, raw: Union[dict, str, os.PathLike], attn_implementation: str = "sdpa"):
        """The HF config from a config.json dict or path (``_comment``/``model_type`` ignored), with
        ``attn_implementation`` for the LM (the vision tower gets sdpa instead of FlashAttention-2)."""
        raw = json.loads(Path(raw).read_text()) if isinstance(raw, (str, os.PathLike)) else json.loads(json.dumps(raw))
        raw.pop("_comment", None)
        raw.pop("model_type", None)
        config = cls.config_class()(**raw)
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
        return config

    @classmethod
    def special_ids(cls, config) -> dict[str, int]:
        """Special-token ids consistent with the model config (tiny: 256..264)."""
        return assign_special_ids(cls.config_special_ids(config), config.text_config.vocab_size)

    @classmethod
    def make_tokenizer(cls, config, words: Sequence[str] = (), name: str = ""):
        """The byte-level tokenizer (plus ``words``) of a random-weight or toy model of this config."""
        tokenizer = byte_tokenizer(cls.special_ids(config), words)
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(f"{name or cls.family}: tokenizer has {len(tokenizer)} tokens, more than vocab_size "
                             f"{config.text_config.vocab_size}")
        return tokenizer

    # -- model structure -------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    @abc.abstractmethod
    def video_token_id(self) -> int:
        """Id of the video placeholder token in ``input_ids``."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abc.abstractmethod
    def frame_size(self) -> int:
        """Side (pixels) of the vision tower's unit: LLaVA-OV the frame size, Qwen2-VL one merged patch."""

    # -- layout ----------------------------------------------------------------------------
    def layout(self, inputs: dict) -> VisualLayout:
        """Visual-token layout of model inputs (raises if there is no video in them)."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("inputs have no input_ids; build them with Backbone.prepare or synthetic_inputs")
        layout, expected = self._video_layout(inputs)
        self._check_placeholders(input_ids, expected)
        return layout

    @abc.abstractmethod
    def _video_layout(self, inputs: dict) -> tuple[VisualLayout, int]:
        """The layout of the video in ``inputs`` and the placeholder tokens each sample must hold."""

    def _check_placeholders(self, input_ids: torch.Tensor, expected: int) -> None:
        counts = (input_ids == self.video_token_id).sum(dim=1)
        if int(counts.min()) == 0:
            raise ValueError("inputs contain no visual tokens (no video placeholder tokens in input_ids)")
        if not bool((counts == expected).all()):
            raise ValueError(
                f"video placeholder count {counts.tolist()} does not match the video layout "
                f"({expected} per sample); one video per sample is supported")

    def visual_mask(self, input_ids: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
        """(b, s) bool: the layout's visual tokens."""
        return input_ids == self.video_token_id

    # -- prompts ---------------------------------------------------------------------------
    @abc.abstractmethod
    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None) -> int:
        """Video placeholder tokens of one sample's pixels."""

    @abc.abstractmethod
    def build_prompt(self, question: str, n_placeholders: int) -> str:
        """The chat prompt of lmms-eval's built-in wrapper with the video's placeholder tokens."""

    # -- pixels ----------------------------------------------------------------------------
    @abc.abstractmethod
    def sample_frames(self, video: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
        """The frames (T, H, W, 3) uint8 lmms-eval's wrapper feeds the model for a video file or array."""

    @abc.abstractmethod
    def visual_frame_indices(self, total_frames: int, fps: float) -> np.ndarray:
        """(F, k) int: indices (into a video of ``total_frames`` at ``fps``) of the frames behind each
        visual-token frame of :meth:`prepare` (LLaVA-OV k = 1; Qwen2-VL k = 2 per temporal patch)."""

    @abc.abstractmethod
    def video_pixels(self, frames: np.ndarray) -> dict:
        """One sample's pixel inputs (float32, CPU) of decoded frames (T, H, W, 3) uint8:
        ``{"pixel_values_videos": ...}`` plus any family extras (Qwen2-VL: ``video_grid_thw``)."""

    @abc.abstractmethod
    def collate_pixels(self, samples: Sequence[dict]) -> dict:
        """The batch's pixel inputs from per-sample :meth:`video_pixels` dicts (sample order)."""

    @abc.abstractmethod
    def synthetic_frame_size(self) -> tuple[int, int]:
        """(h, w) of the random frames of :meth:`synthetic_inputs` when no size is given."""

    @abc.abstractmethod
    def _black_pixels(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Pixels of an all-black video, same shape, dtype and device as ``pixel_values_videos``."""

    @abc.abstractmethod
    def vision_settings(self) -> dict:
        """The vision config entries that determine :meth:`video_pixels` (a cache key)."""

    @abc.abstractmethod
    def pixel_mean_std(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """float32 per-element normalisation mean and std, broadcastable to one sample's
        ``pixel_values_videos`` of ``shape`` (pixels = (uint8 / 255 - mean) / std)."""

    # -- inputs ----------------------------------------------------------------------------
    def _tokenize(self, prompts: Sequence[str]) -> dict:
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                **compat.text_inputs(self.model, enc["input_ids"])}

    def pixels_to_inputs(self, frames: np.ndarray, questions: Union[str, Sequence[str]]) -> dict:
        """Model inputs from decoded frames (T, H, W, 3) uint8 and one question per sample."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        pixels = self.video_pixels(frames)
        n = self.n_placeholders(**pixels)
        out = self._tokenize([self.build_prompt(q, n) for q in questions])
        out.update(self.collate_pixels([pixels] * len(questions)))
        return self._to_model(out)

    def prepare(self, video: Union[str, os.PathLike, np.ndarray], question: str) -> dict:
        """Video file (or frames array) + question -> model inputs, preprocessed like lmms-eval's wrappers.

        LLaVA-OV: ``num_frames`` (32) frames sampled uniformly with decord, SigLIP-384 preprocessing.
        Qwen2-VL: the qwen2_vl wrapper's frame selection and pixel limits.
        """
        return self.pixels_to_inputs(self.sample_frames(video), question)

    def synthetic_inputs(self, frames: int = 8, seed: int = 0, batch_size: int = 1,
                         question: str = "What happens in the video?", pad: bool = True,
                         size: Optional[tuple[int, int]] = None) -> dict:
        """Random-pixel video inputs for tests and benchmarks (no decoding, no torchvision).

        With batch_size > 1 the questions differ in length, so the batch is left-padded. ``size``
        (h, w) sets the frame resolution (Qwen2-VL: e.g. (336, 420) gives 12 x 15 = 180 tokens per
        temporal patch, the paper's 2880 tokens for 32 frames).
        """
        g = np.random.default_rng(seed)
        h, w = size or self.synthetic_frame_size()
        pixels = g.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
        questions = [question + " Answer briefly." * (i if pad else 0) for i in range(batch_size)]
        return self.pixels_to_inputs(pixels, questions)

    def black_inputs(self, inputs: dict) -> dict:
        """The same inputs with an all-black video (same frames, resolution and prompt): PosC's probe."""
        out = dict(inputs)
        out["pixel_values_videos"] = self._black_pixels(inputs["pixel_values_videos"])
        return out

    def _to_model(self, inputs: dict) -> dict:
        dev, dtype = self.device, self.dtype
        return {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

    # -- vision tower (pre-LLM methods) ----------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def vision_depth(cls, vision_config: dict) -> int:
        """Vision-encoder layers of a config.json's ``vision_config`` (read before a model is built)."""

    @property
    @abc.abstractmethod
    def vision_layers(self) -> torch.nn.ModuleList:
        """The vision encoder's layer modules (the ones a vision hook attaches to)."""

    @property
    @abc.abstractmethod
    def feature_layer(self) -> int:
        """Index (in :attr:`vision_layers`) of the layer whose output becomes the LLM's visual tokens."""

    def resolve_vision_layer(self, layer: Union[int, str, None]) -> int:
        """A vision layer index in ``0 .. len(vision_layers) - 1``: None or "feature" -> :attr:`feature_layer`,
        negative ints count from the end; anything else out of range raises ValueError."""
        n = len(self.vision_layers)
        if layer is None or layer == "feature":
            return self.feature_layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"vision layer {layer!r}: expected an int in [{-n}, {n - 1}], None or 'feature'")
        if not -n <= int(layer) < n:
            raise ValueError(f"vision layer {layer} out of range: {self.name} has {n} vision layers, "
                             f"valid {-n}..{n - 1} (or None / 'feature')")
        return int(layer) % n

    @abc.abstractmethod
    def visual_features_to_tokens(self, per_patch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Map per-patch vision features onto the LLM's visual tokens, as the model maps its features.

        per_patch: (b * frames * patches, C) or (b * frames * patches,) in the vision tower's row
        order (sample-major). Returns (b, n_visual, C) or (b, n_visual)."""

    @abc.abstractmethod
    def _vision_qk(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-rotary queries and keys of a vision layer for its input rows: (N, heads, head_dim) each
        (N = all patches of the batch), in the model's dtype; and nothing else of the layer is run."""

    def vision_qk_capture(self, block: torch.nn.Module) -> Optional[tuple[list, Callable]]:
        """(modules, combine): the vision layer's query and key projections, whose outputs in the layer's
        own call ``combine(*outputs)`` turns into the (q, k) of :meth:`_vision_qk` (the same values), so
        the engine keeps them instead of recomputing them; None (default): recomputed."""
        return None

    @abc.abstractmethod
    def _vision_chunks(self, captured: dict, n_rows: int) -> list[int]:
        """Rows per attention chunk (a frame / temporal patch) of the captured call (sum ``n_rows``)."""

    @abc.abstractmethod
    def _vision_scale(self, block: torch.nn.Module) -> float:
        """The layer's attention-logit scale."""

    def _vision_rope(self, block: torch.nn.Module, captured: dict) -> Optional[RopeFn]:
        """The layer's rotary embedding of queries and keys (None: the family has none)."""
        return None

    # -- session hooks (family) ------------------------------------------------------------
    def install_session_hooks(self, session) -> None:
        """Family-specific hooks of a pruning session, registered with ``session.add_hook`` (removed
        with the session). Default: none. Qwen2.5-VL records the tower's ``grid_thw`` for its window
        permutation; Qwen3-VL moves DeepStack's injection onto the kept tokens."""

    def vision_maps(self, layer: int, captured: dict, batch_size: int) -> VisionMaps:
        """Hidden states, head-mean keys and received attention of vision layer ``layer`` per LLM
        visual token, from ``captured = {"args", "kwargs", "output"}`` of that layer's call.

        Each field is computed when first read (:class:`VisionMaps` is lazy): ``hidden`` maps the
        captured output; ``keys`` and ``attention`` recompute only that layer's queries and keys (once,
        shared), or take them from ``captured["qk"]`` when the engine kept them from the layer's own
        projections (:meth:`vision_qk_capture`); the attention is float32, computed a few frames at a
        time (``attention_budget`` logits at most). See :class:`VisionMaps`.
        """
        layout = self._captured_token_layout(captured)
        block = self.vision_layers[self.resolve_vision_layer(layer)]
        qk: dict = {}

        @torch.no_grad()
        def queries_keys() -> tuple[torch.Tensor, torch.Tensor]:  # (N, heads, head_dim) each, computed once
            if not qk:
                kept = captured.get("qk")
                qk["q"], qk["k"] = kept if kept is not None else self._vision_qk(block, captured_input(captured))
            return qk["q"], qk["k"]

        @torch.no_grad()
        def hidden() -> torch.Tensor:
            out = captured_output(captured)
            return self.visual_features_to_tokens(out.reshape(-1, out.shape[-1]), batch_size, **layout)

        @torch.no_grad()
        def keys() -> torch.Tensor:
            return self.visual_features_to_tokens(queries_keys()[1].mean(dim=1), batch_size, **layout)

        @torch.no_grad()
        def attention() -> torch.Tensor:
            q, k = queries_keys()
            budget = self.attention_budget if q.device.type != "cpu" else min(self.attention_budget, CPU_ATTENTION_BUDGET)
            received = received_attention(q, k, self._vision_scale(block), self._vision_chunks(captured, q.shape[0]),
                                          rope=self._vision_rope(block, captured), budget=budget)
            return self.visual_features_to_tokens(received, batch_size, **layout)

        return VisionMaps(lazy={"hidden": hidden, "keys": keys, "attention": attention})

    def frame_pooling(self, layer: int, captured: dict, batch_size: int) -> FramePooling:
        """Per-frame global feature and probe attention of vision layer ``layer`` (FastVID's inputs;
        :class:`~sharp.backbones.vision.FramePooling`), from its captured call. Family-specific."""
        raise ValueError(f"{self.name}: the {self.family} family has no per-frame pooling of its vision tower")

    def _captured_token_layout(self, captured: dict) -> dict:
        """Extra keyword arguments of :meth:`visual_features_to_tokens` that a captured vision-layer
        call determines (none by default; Qwen2.5-VL: the call's ``grid_thw`` for its window order)."""
        return {}

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build_random(cls, name: str, spec: dict[str, Any], attn_implementation: str, dtype: torch.dtype,
                     device: str, seed: int) -> tuple[torch.nn.Module, Any]:
        """Model (seeded random init, then the spec's trained weights if any) and byte tokenizer."""
        config = cls.build_config(_config_path(spec), attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.model_class()(config)
        if spec.get("weights"):
            _load_weights(model, spec["weights"], name)
        model = model.to(device=device, dtype=dtype).eval()
        return model, cls.make_tokenizer(config, spec.get("words", ()), name)

    @classmethod
    def load_pretrained(cls, hub: str, attn_implementation: str, dtype: torch.dtype,
                        device: str) -> tuple[torch.nn.Module, Any]:
        """Model and tokenizer of a hub checkpoint (or local folder) from the HF cache."""
        from transformers import AutoTokenizer

        try:
            model = cls.model_class().from_pretrained(hub, dtype=dtype, attn_implementation=attn_implementation,
                                                      device_map=device)
            tokenizer = AutoTokenizer.from_pretrained(hub)
        except OSError as err:
            home = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise RuntimeError(
                f"weights of {hub!r} are not available here ({err.__class__.__name__}). Fetch them on a machine "
                f"with internet: `huggingface-cli download {hub}` (they land in $HF_HOME/hub/models--"
                f"{hub.replace('/', '--')}; HF_HOME is {home}), then run offline with HF_HUB_OFFLINE=1. "
                f"For latency work without weights use random_weights=True."
            ) from None
        return model.eval(), tokenizer


def _load_weights(model: torch.nn.Module, folder: str, name: str) -> None:
    """Load ``folder/model.safetensors`` into ``model`` (only an untied ``lm_head`` may be missing)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(compat.match_state_dict(model, state), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"weights of {name} do not match its config: missing={missing} unexpected={unexpected}")


def load_backbone(name: str, *, attn_implementation: str = "sdpa", random_weights: Optional[bool] = None,
                  dtype: Optional[torch.dtype] = None, device: Optional[str] = None, seed: int = 0,
                  num_frames: Optional[int] = None, checkpoint: Optional[str] = None,
                  weights_dir: Optional[Union[str, os.PathLike]] = None, **video_kwargs) -> Backbone:
    """Load a backbone by name.

    name: llava_onevision_7b | qwen2_vl_7b (HF checkpoints; ``random_weights=True`` builds the same
        architecture from the configs in ``sharp/backbones/model_configs`` without downloading) |
        tiny_llava_onevision | tiny_qwen2_vl (toy size, seeded random weights, fast on CPU) |
        toy_* (trained toy weights shipped in ``sharp/weights``).
    attn_implementation: sdpa (default) | eager | flash_attention_2.
    weights_dir: for a trained-weights backbone (toy_*), load another copy of it from this folder
        (``backbone.json``, ``config.json``, ``model.safetensors``; or its ``<name>/`` subfolder),
        e.g. one retrained by ``scripts/train_toy.py --out-dir``.
    """
    spec = _resolve_spec(name, weights_dir)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    cls = family_class(spec["family"])
    dtype = dtype or spec["dtype"]
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hub = checkpoint or spec.get("hub")
    if random_weights is None:
        random_weights = hub is None
    if random_weights or hub is None:
        model, tokenizer = cls.build_random(name, spec, attn_implementation, dtype, device, seed)
    else:
        model, tokenizer = cls.load_pretrained(hub, attn_implementation, dtype, device)
    num_frames = num_frames or spec.get("num_frames", 32)  # the backbone's paper-style count (LLaVA-Video: 64)
    return cls(name=name, model=model, tokenizer=tokenizer, num_frames=num_frames,
               video_kwargs={**spec.get("video_kwargs", {}), **video_kwargs},
               pretrained=not (random_weights or hub is None))
