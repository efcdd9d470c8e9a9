"""Backbones: unmodified HF video LLMs plus the visual-token layout of their inputs.

`load_backbone(name)` returns a :class:`Backbone` whose ``.model`` is a plain HF model
(``LlavaOnevisionForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``). Pruning never
edits the model; :func:`sharp.prune` attaches hooks for the duration of a ``with`` block.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

_CONFIG_DIR = Path(__file__).parent / "model_configs"

# name -> (kind, hub checkpoint or None, config json, default dtype)
_BACKBONES: dict[str, dict[str, Any]] = {
    "llava_onevision_7b": dict(kind="llava_onevision", hub="llava-hf/llava-onevision-qwen2-7b-ov-hf",
                               config="llava_onevision_7b.json", dtype=torch.bfloat16),
    "qwen2_vl_7b": dict(kind="qwen2_vl", hub="Qwen/Qwen2-VL-7B-Instruct",
                        config="qwen2_vl_7b.json", dtype=torch.bfloat16),
    "tiny_llava_onevision": dict(kind="llava_onevision", hub=None, config="tiny_llava_onevision.json",
                                 dtype=torch.float32),
    "tiny_qwen2_vl": dict(kind="qwen2_vl", hub=None, config="tiny_qwen2_vl.json", dtype=torch.float32,
                          video_kwargs=dict(max_pixels=112 * 112)),
    # mid-size random-weight configs: seconds per prefill on CPU (latency benchmarks)
    "mid_llava_onevision": dict(kind="llava_onevision", hub=None, config="mid_llava_onevision.json",
                                dtype=torch.float32),
    "mid_qwen2_vl": dict(kind="qwen2_vl", hub=None, config="mid_qwen2_vl.json", dtype=torch.float32),
}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# Prompt formats of lmms-eval 0.7.3's built-in wrappers (the paper's numbers came from these):
# llava_onevision: LLaVA-NeXT conv template "qwen_1_5" (ChatML), "<image>\n" + context as user turn;
# qwen2_vl: processor.apply_chat_template with system "You are a helpful assistant." and the video
# before the text in the user turn.
_LLAVA_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{visual}\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
_QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{visual}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)


def backbone_names() -> list[str]:
    return sorted(_BACKBONES) + sorted(n for n in _extra_backbones() if n not in _BACKBONES)


def _extra_backbones() -> dict[str, dict[str, Any]]:
    """Backbones with shipped trained weights (sharp/weights/<name>/), e.g. the toy models."""
    root = Path(__file__).parent / "weights"
    if not root.is_dir():
        return {}
    return {d.name: _weights_spec(d) for d in sorted(root.iterdir()) if (d / "backbone.json").is_file()}


def _weights_spec(d: Path) -> dict[str, Any]:
    """The spec of a trained-weights folder: backbone.json (kind, word vocabulary), config.json and
    model.safetensors (float32)."""
    info = json.loads((d / "backbone.json").read_text())
    return dict(kind=info["kind"], hub=None, config=str(d / "config.json"), dtype=torch.float32,
                weights=str(d), words=info.get("words", ()))


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


def _byte_tokenizer(special_ids: dict[str, int], words: Sequence[str] = ()):
    """A byte-level tokenizer (256 byte tokens + specials at given ids) that needs no download.

    With ``words`` (pre-tokenized pieces in ByteLevel's alphabet, e.g. ``"Ġcolour"``), each of them
    is one token (ids after the last special), the text being split GPT-2 style into words first;
    any other word is spelled in bytes. The trained toys use this: short prompts, one token per word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's alphabet is the 256 printable stand-ins for bytes; order them by byte value.
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_ORDER.get(ch, 0))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update(special_ids)
    first = max(vocab.values()) + 1
    for k, w in enumerate(w for w in words if w not in vocab):
        vocab[w] = first + k
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(words))
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special_ids)})
    fast.pad_token = "<|endoftext|>"
    fast.eos_token = "<|im_end|>"
    return fast


def _gpt2_byte_order() -> dict[str, int]:
    # GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _gpt2_byte_order()
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>",
             "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _special_ids(kind: str, config) -> dict[str, int]:
    """Special-token ids consistent with the model config (tiny: 256..264)."""
    if kind == "llava_onevision":
        base = {"<image>": config.image_token_index, "<video>": config.video_token_index}
    else:
        base = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
    used = set(base.values())
    ids, nxt = dict(base), (256 if config.text_config.vocab_size < 1000 else 151643)
    for name in _SPECIALS:
        if name in ids:
            continue
        while nxt in used:
            nxt += 1
        ids[name] = nxt
        used.add(nxt)
        nxt += 1
    return ids


@dataclass
class Backbone:
    """An unmodified HF video LLM plus what the engine needs to know about its inputs."""

    name: str
    kind: str  # "llava_onevision" | "qwen2_vl"
    model: torch.nn.Module
    tokenizer: Any
    num_frames: int = 32  # frames sampled per video by prepare()
    video_kwargs: dict = field(default_factory=dict)

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
    def video_token_id(self) -> int:
        c = self.config
        return c.video_token_index if self.kind == "llava_onevision" else c.video_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def frame_size(self) -> int:
        if self.kind == "llava_onevision":
            return self.config.vision_config.image_size
        return 2 * self.config.vision_config.patch_size * self.config.vision_config.spatial_merge_size

    # -- layout ----------------------------------------------------------------------------
    def layout(self, inputs: dict) -> VisualLayout:
        """Visual-token layout of model inputs (raises if there is no video in them)."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("inputs have no input_ids; build them with Backbone.prepare or synthetic_inputs")
        if self.kind == "llava_onevision":
            pv = inputs.get("pixel_values_videos")
            if pv is None:
                raise ValueError(
                    "inputs contain no visual tokens: pixel_values_videos is missing (pruning needs a video; "
                    "images and text-only prompts are not supported)")
            frames = pv.shape[1]
            side = self.config.vision_config.image_size // self.config.vision_config.patch_size
            side = (side + 1) // 2  # 2x2 bilinear pooling, ceil as in HF apply_pooling
            layout = VisualLayout(frames * side * side, frames, side * side, (side, side))
            expected = layout.n_visual + 1  # + one image_newline per video
        else:
            thw = inputs.get("video_grid_thw")
            if thw is None or inputs.get("pixel_values_videos") is None:
                raise ValueError(
                    "inputs contain no visual tokens: pixel_values_videos / video_grid_thw are missing "
                    "(pruning needs a video; images and text-only prompts are not supported)")
            if thw.shape[0] != input_ids.shape[0]:
                raise ValueError("exactly one video per sample is supported (video_grid_thw rows != batch size)")
            if not bool((thw == thw[0]).all()):
                raise ValueError("all samples of a batch must share one video layout (video_grid_thw differs)")
            merge = self.config.vision_config.spatial_merge_size
            t, h, w = (int(x) for x in thw[0])
            gh, gw = h // merge, w // merge
            layout = VisualLayout(t * gh * gw, t, gh * gw, (gh, gw))
            expected = layout.n_visual
        counts = (input_ids == self.video_token_id).sum(dim=1)
        if int(counts.min()) == 0:
            raise ValueError("inputs contain no visual tokens (no video placeholder tokens in input_ids)")
        if not bool((counts == expected).all()):
            raise ValueError(
                f"video placeholder count {counts.tolist()} does not match the video layout "
                f"({expected} per sample); one video per sample is supported")
        return layout

    def visual_mask(self, input_ids: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
        """(b, s) bool: the layout's visual tokens (LLaVA-OV: the trailing newline excluded)."""
        is_video = input_ids == self.video_token_id
        if self.kind == "llava_onevision":
            # the last placeholder of each sample is the image_newline: count it as text
            rank = is_video.long().cumsum(dim=1)
            is_video = is_video & (rank <= layout.n_visual)
        return is_video

    # -- inputs ----------------------------------------------------------------------------
    def _tokenize(self, prompts: Sequence[str]) -> dict:
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def n_placeholders(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None) -> int:
        """Video placeholder tokens of one sample's pixels: LLaVA-OV (T, 3, S, S) -> T x pooled side^2
        + 1 image_newline; Qwen2-VL: video_grid_thw (1, 3) -> t*h*w / merge^2."""
        vc = self.config.vision_config
        if self.kind == "llava_onevision":
            side = ((vc.image_size // vc.patch_size) + 1) // 2  # 2x2 bilinear pooling, ceil
            return pixel_values_videos.shape[0] * side * side + 1
        return int(video_grid_thw[0].prod()) // (vc.spatial_merge_size ** 2)

    def build_prompt(self, question: str, n_placeholders: int) -> str:
        """The chat prompt of lmms-eval's built-in wrapper with the video's placeholder tokens."""
        if self.kind == "llava_onevision":
            visual = "<video>" * n_placeholders
            if "<image>" in question:  # the wrapper then lets the context place the visual token
                return _LLAVA_PROMPT.replace("{visual}\n", "").format(question=question.replace("<image>", visual, 1))
            return _LLAVA_PROMPT.format(visual=visual, question=question)
        # the qwen2_vl wrapper strips "<image>" from contexts
        return _QWEN_PROMPT.format(visual="<|video_pad|>" * n_placeholders, question=question.replace("<image>", ""))

    def pixels_to_inputs(self, frames: np.ndarray, questions: Union[str, Sequence[str]]) -> dict:
        """Model inputs from decoded frames (T, H, W, 3) uint8 and one question per sample."""
        from sharp import video as V

        questions = [questions] if isinstance(questions, str) else list(questions)
        if self.kind == "llava_onevision":
            size = self.config.vision_config.image_size
            pixels = V.siglip_preprocess(frames, image_size=size)  # (T, 3, size, size)
            pv = pixels.unsqueeze(0).expand(len(questions), *pixels.shape).contiguous()
            out = self._tokenize([self.build_prompt(q, self.n_placeholders(pixels)) for q in questions])
            out["pixel_values_videos"] = pv
        else:
            vc = self.config.vision_config
            pv, thw = V.qwen2vl_preprocess(frames, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                           temporal_patch_size=vc.temporal_patch_size,
                                           **{k: v for k, v in self.video_kwargs.items()
                                              if k in ("min_pixels", "max_pixels")})
            out = self._tokenize([self.build_prompt(q, self.n_placeholders(pv, thw)) for q in questions])
            out["pixel_values_videos"] = pv.repeat(len(questions), 1)
            out["video_grid_thw"] = thw.repeat(len(questions), 1)
        return self._to_model(out)

    def prepare(self, video: Union[str, os.PathLike, np.ndarray], question: str) -> dict:
        """Video file (or frames array) + question -> model inputs, preprocessed like lmms-eval's wrappers.

        LLaVA-OV: ``num_frames`` (32) frames sampled uniformly with decord, SigLIP-384 preprocessing.
        Qwen2-VL: the qwen2_vl wrapper's frame selection and pixel limits.
        """
        from sharp import video as V

        if self.kind == "llava_onevision":
            frames = V.load_frames_uniform(video, self.num_frames)
        else:
            vc = self.config.vision_config
            frames = V.qwen2vl_sample_frames(video, max_num_frames=self.num_frames, patch_size=vc.patch_size,
                                             merge_size=vc.spatial_merge_size, **self.video_kwargs)
        return self.pixels_to_inputs(frames, question)

    def synthetic_inputs(self, frames: int = 8, seed: int = 0, batch_size: int = 1,
                         question: str = "What happens in the video?", pad: bool = True,
                         size: Optional[tuple[int, int]] = None) -> dict:
        """Random-pixel video inputs for tests and benchmarks (no decoding, no torchvision).

        With batch_size > 1 the questions differ in length, so the batch is left-padded. ``size``
        (h, w) sets the frame resolution (Qwen2-VL: e.g. (336, 420) gives 12 x 15 = 180 tokens per
        temporal patch, the paper's 2880 tokens for 32 frames).
        """
        g = np.random.default_rng(seed)
        side = self.frame_size() if self.kind == "llava_onevision" else 2 * self.frame_size()
        h, w = size or (side, side)
        pixels = g.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
        questions = [question + " Answer briefly." * (i if pad else 0) for i in range(batch_size)]
        return self.pixels_to_inputs(pixels, questions)

    def black_inputs(self, inputs: dict) -> dict:
        """The same inputs with an all-black video (same frames, resolution and prompt): PosC's probe."""
        from sharp import video as V

        out = dict(inputs)
        pv = inputs["pixel_values_videos"]
        if self.kind == "llava_onevision":
            black = V.siglip_preprocess(np.zeros((1, 8, 8, 3), np.uint8), image_size=pv.shape[-1])[0]  # (3, H, W)
            out["pixel_values_videos"] = black.to(pv).view(1, 1, *black.shape).expand_as(pv).contiguous()
        else:
            vc = self.config.vision_config
            side = vc.patch_size * vc.spatial_merge_size
            black, _ = V.qwen2vl_preprocess(np.zeros((vc.temporal_patch_size, side, side, 3), np.uint8),
                                            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                            temporal_patch_size=vc.temporal_patch_size,
                                            min_pixels=side * side, max_pixels=side * side)
            out["pixel_values_videos"] = black[:1].to(pv).expand_as(pv).contiguous()
        return out

    def _to_model(self, inputs: dict) -> dict:
        dev, dtype = self.device, self.dtype
        return {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}


def _build_config(kind: str, path: Path, attn_implementation: str):
    from transformers import LlavaOnevisionConfig, Qwen2VLConfig

    raw = json.loads(Path(path).read_text())
    raw.pop("_comment", None)
    raw.pop("model_type", None)
    cls = LlavaOnevisionConfig if kind == "llava_onevision" else Qwen2VLConfig
    config = cls(**raw)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation
    return config


def _model_class(kind: str):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration if kind == "llava_onevision" else Qwen2VLForConditionalGeneration


def load_backbone(name: str, *, attn_implementation: str = "sdpa", random_weights: Optional[bool] = None,
                  dtype: Optional[torch.dtype] = None, device: Optional[str] = None, seed: int = 0,
                  num_frames: int = 32, checkpoint: Optional[str] = None,
                  weights_dir: Optional[Union[str, os.PathLike]] = None, **video_kwargs) -> Backbone:
    """Load a backbone by name.

    name: llava_onevision_7b | qwen2_vl_7b (HF checkpoints; ``random_weights=True`` builds the same
        architecture from the configs in ``sharp/model_configs`` without downloading) |
        tiny_llava_onevision | tiny_qwen2_vl (toy size, seeded random weights, fast on CPU) |
        toy_* (trained toy weights shipped in ``sharp/weights``).
    attn_implementation: sdpa (default) | eager | flash_attention_2.
    weights_dir: for a trained-weights backbone (toy_*), load another copy of it from this folder
        (``backbone.json``, ``config.json``, ``model.safetensors``; or its ``<name>/`` subfolder),
        e.g. one retrained by ``scripts/train_toy.py --out-dir``.
    """
    specs = {**_BACKBONES, **_extra_backbones()}
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(specs))}")
    if weights_dir is not None:
        if not specs[name].get("weights"):
            raise ValueError(f"weights_dir is for trained-weights backbones ({', '.join(sorted(_extra_backbones()))}), "
                             f"not {name!r}")
        d = Path(weights_dir)
        d = d / name if (d / name / "backbone.json").is_file() else d
        if not (d / "backbone.json").is_file():
            raise FileNotFoundError(f"{d}: no backbone.json (expected backbone.json, config.json, model.safetensors)")
        specs[name] = _weights_spec(d)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    spec = specs[name]
    kind = spec["kind"]
    dtype = dtype or spec["dtype"]
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg_path = Path(spec["config"]) if os.path.isabs(spec["config"]) else _CONFIG_DIR / spec["config"]
    hub = checkpoint or spec.get("hub")
    if random_weights is None:
        random_weights = hub is None
    if random_weights or hub is None:
        config = _build_config(kind, cfg_path, attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _model_class(kind)(config)
        if spec.get("weights"):
            from safetensors.torch import load_file

            state = load_file(os.path.join(spec["weights"], "model.safetensors"))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if "lm_head" not in m]:
                raise RuntimeError(f"weights of {name} do not match its config: missing={missing} unexpected={unexpected}")
        model = model.to(device=device, dtype=dtype).eval()
        tokenizer = _byte_tokenizer(_special_ids(kind, config), spec.get("words", ()))
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens, more than vocab_size "
                             f"{config.text_config.vocab_size}")
    else:
        model, tokenizer = _load_pretrained(kind, hub, attn_implementation, dtype, device)
    video_kwargs = {**spec.get("video_kwargs", {}), **video_kwargs}
    return Backbone(name=name, kind=kind, model=model, tokenizer=tokenizer, num_frames=num_frames,
                    video_kwargs=video_kwargs)


def _load_pretrained(kind: str, hub: str, attn_implementation: str, dtype, device):
    from transformers import AutoTokenizer

    try:
        model = _model_class(kind).from_pretrained(hub, dtype=dtype, attn_implementation=attn_implementation,
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
