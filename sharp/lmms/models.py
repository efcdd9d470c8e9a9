"""Thin lmms-eval wrappers: one video per request, pruning through ``sharp.prune``.

Frame sampling and prompt formatting are the backbone's (``Backbone.prepare``, which follows
lmms-eval's built-in ``llava_onevision`` / ``qwen2_vl`` wrappers); generation follows the built-ins
too: greedy unless the task asks for a temperature > 0, ``max_new_tokens`` from the task (built-in
defaults 1024 for LLaVA-OV and 128 for Qwen2-VL when the task sets none), the answer cut at the
task's ``until`` strings and stripped. All pruning logic lives in :mod:`sharp`; this file only
measures it.

Per request the wrapper records visual tokens before/after pruning, prefill milliseconds, prefill
TFLOPs (paper convention) and peak memory in ``self.request_stats``; the same numbers go to
lmms-eval's throughput log (``results["throughput"]["avg_<key>"]``), so the CLI reports them too.

A video stored as a frame folder (MVBench's TVQA clips) is read as the video of its frames at 3 fps
(:mod:`sharp.lmms.frame_folders`). A request whose video cannot be used (missing, empty, corrupt,
undecodable, unsupported: any error while reading and sampling its frames) is answered with an empty
string, logged with its reason and recorded as ``{"task", "doc_id", "failed": reason, "video"}`` in
``request_stats``; it never falls back to a text-only answer (lmms-eval's built-ins do). ``strict=true`` raises on the first such
request instead, and a run whose first requests all fail stops (that is the setup, not one video).

``batch_size`` > 1: requests with the same frame-array shape (hence the same visual layout) and
the same generation settings are run together as one left-padded batch (``sharp.prune`` supports
them); a request waits at most until ``2 x batch_size`` requests are pending. Latencies are then per
batch. Data parallel: under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) the wrapper
takes its rank and world size from accelerate and runs on ``cuda:<local rank>``; lmms-eval gives
each rank its share of the documents, and the wrapper answers the evaluator's rank-padding requests
(``metadata["__padding_only__"]``) without running the model.
"""
from __future__ import annotations

import gc

import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from sharp.harness.resources import HarnessError, MissingResourceError, explain  # noqa: F401
from sharp.lmms.args import ModelArgsError, nest_child_kwargs
from sharp.lmms.frame_folders import FrameFolderVideos

# Arguments that go to sharp.load_backbone when given (``pretrained``, lmms-eval's name, = ``checkpoint``).
_BACKBONE_ARGS = ("pretrained", "checkpoint", "dtype", "attn_implementation", "num_frames", "random_weights",
                  "max_pixels", "min_pixels")
# Generation kwargs (from the task yaml or --gen_kwargs) that are passed on to generate().
_PASSED_GEN_KWARGS = ("num_beams", "top_p", "top_k", "repetition_penalty", "length_penalty", "min_new_tokens")
_SAMPLING_ONLY = ("top_p", "top_k")
# A run whose first FAIL_FAST requests (or all, if fewer) all fail stops: the data is missing, not one video.
FAIL_FAST = 5


def _coerce(value: Any) -> Any:
    """lmms-eval parses model_args values into bool/int/float/str; 'None' stays a string, 'a|b' is a list."""
    if isinstance(value, str):
        if value in ("None", "none", "null"):
            return None
        if "|" in value:
            from lmms_eval.utils import simple_parse_args_string

            return [_coerce(simple_parse_args_string(f"x={v}")["x"]) for v in value.split("|")]
    return value


def known_backbones(family: str) -> list[str]:
    """The registered backbones of ``family`` (sharp.backbones), the family's default first."""
    from sharp.harness.catalog import family_backbones

    return family_backbones(family)


class VideoFailure(Exception):
    """A request's video cannot be used; the message is the reason (it names the file)."""


@dataclass
class _Pending:
    """A decoded request waiting for its batch."""

    index: int                 # position in generate_until's request list
    context: str
    task: str
    doc_id: Any
    settings: dict
    until: list
    frames: np.ndarray         # (T, H, W, 3) uint8, as the backbone's sample_frames returns them
    video: Optional[str]

    @property
    def key(self) -> tuple:
        """Requests with one key share a batch: same frames shape (-> same visual layout), same settings."""
        return (tuple(self.frames.shape), repr(sorted(self.settings.items())), tuple(self.until))


class LayoutBatches:
    """Requests grouped into batches of up to ``size`` by :attr:`_Pending.key`, in arrival order.

    :meth:`add` returns the batches that are ready: a group that reached ``size``, or, when more than
    ``max_pending`` requests wait, the largest group (so memory stays bounded with many layouts)."""

    def __init__(self, size: int, max_pending: Optional[int] = None):
        self.size = int(size)
        self.max_pending = max(self.size, int(max_pending if max_pending is not None else 2 * self.size))
        self.groups: dict[tuple, list] = {}

    def pending(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def add(self, item, key: Optional[tuple] = None) -> list[list]:
        key = item.key if key is None else key
        group = self.groups.setdefault(key, [])
        group.append(item)
        ready = []
        if len(group) >= self.size:
            ready.append(self.groups.pop(key))
        while self.pending() > self.max_pending:
            largest = max(self.groups, key=lambda k: len(self.groups[k]))
            ready.append(self.groups.pop(largest))
        return ready

    def drain(self) -> list[list]:
        ready = list(self.groups.values())
        self.groups = {}
        return ready


def per_sample_layers(kept: list, stage_layers: list, measured: list[int], n_visual: int, batch: int) -> Optional[list[list[int]]]:
    """Visual tokens each decoder layer processed, per sample of a batch: ``n_visual`` until the first
    applied stage, then the count kept by the last stage at or before the layer (``kept[stage][sample]``).
    ``measured`` is the engine's count for sample 0; None when the two disagree for sample 0."""
    def counts(i: int) -> list[int]:
        out = []
        for layer in range(len(measured)):
            c = n_visual
            for j, at in enumerate(stage_layers):
                if at <= layer:
                    c = int(kept[j][i].numel())
            out.append(c)
        return out

    first = counts(0)
    if first != list(measured):
        return None
    return [first] + [counts(i) for i in range(1, batch)]


class _Timer:
    """Times the first (outermost) forward of ``module`` inside the block: the prefill of generate().

    Nested calls (a method's probe re-running the model, possibly stopped by an exception) are
    skipped: the post-hook runs even when a call raises, so the nesting depth stays right."""

    def __init__(self, module: torch.nn.Module, sync: bool):
        self.module, self.sync = module, sync
        self.depth, self.calls, self.t0, self.prefill_s = 0, 0, None, None

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self.depth += 1
        if self.calls == 0 and self.depth == 1:
            self.t0 = self._now()

    def _post(self, module, args, output):
        self.depth -= 1
        if self.calls == 0 and self.depth == 0:
            self.prefill_s = self._now() - self.t0
        if self.depth == 0:
            self.calls += 1

    def __enter__(self):
        self.handles = [self.module.register_forward_pre_hook(self._pre, prepend=True),
                        self.module.register_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


class SharpVideoLMM(lmms):
    """Base wrapper; subclasses fix the backbone family (and, for per-method ids, the method)."""

    is_simple = True
    family: str = ""
    model_id: str = ""
    fixed_method: Optional[str] = None
    default_max_new_tokens: int = 128
    builtin_name: str = ""  # lmms-eval's built-in wrapper of the same model (prompt variants)

    def __init__(self, backbone: Optional[str] = None, method: Optional[str] = None, retention: float = 1.0,
                 batch_size: Any = 1, max_batch_size: Any = None, device: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, seed: Optional[int] = None, warmup: int = 1,
                 strict: Any = False, **kwargs) -> None:
        super().__init__()
        kwargs = {k: _coerce(v) for k, v in kwargs.items()}
        backbone_overrides = {k: kwargs.pop(k) for k in _BACKBONE_ARGS if k in kwargs}
        backbone_overrides = {k: v for k, v in backbone_overrides.items() if v is not None}
        if "pretrained" in backbone_overrides:
            backbone_overrides["checkpoint"] = backbone_overrides.pop("pretrained")
        self.backbone_name = self._check_backbone(_coerce(backbone))
        self.method, self.retention, self.method_kwargs = self._check_method(_coerce(method), retention, kwargs)
        # the method made once for the backbone (sharp.resolve_method); a backbone loaded from another
        # checkpoint is resolved once it has loaded (its depth comes with it)
        self.pruner = None if "checkpoint" in backbone_overrides else self._resolve(self.backbone_name)
        if self.pruner is None:  # its kwargs are still checked now, before any weights load
            self._check_unresolved()
        self._batch_size = self._check_batch_size(batch_size)
        if not isinstance(strict, bool):
            raise ModelArgsError(f"{self.model_id}: strict={strict!r}; accepted values: true, false")
        self.strict = strict
        self.max_new_tokens_default = int(max_new_tokens) if max_new_tokens else self.default_max_new_tokens
        if seed is not None:
            torch.manual_seed(int(seed))
        if device not in (None, "None") and device != "auto":
            backbone_overrides.setdefault("device", device)
        self._setup_data_parallel(backbone_overrides)
        self.backbone_overrides = backbone_overrides
        self.warmup = int(warmup or 0)  # untimed generate()s before the first request (kernels, caches)
        self.request_stats: list[dict] = []
        self.failed_requests = 0
        self.busy_s = 0.0  # seconds spent in generate_until (throughput)
        self._loaded = 0  # requests whose video decoded, this generate_until call
        self._warned: set[str] = set()

        import sharp

        try:
            self.bb = sharp.load_backbone(self.backbone_name, **backbone_overrides)
        except Exception as err:  # noqa: BLE001
            explained = explain(err, self.backbone_name)
            if explained is not None:
                raise explained from None
            if isinstance(err, (TypeError, ValueError, AttributeError)) and backbone_overrides:
                raise ModelArgsError(f"{self.model_id}: sharp.load_backbone({self.backbone_name!r}, "
                                     f"{backbone_overrides}) failed: {err}") from None
            raise
        self.bb.model.eval()
        self._device = next(self.bb.model.parameters()).device
        if self.pruner is None:
            self.pruner = self._resolve(self.bb)

    # ---------------------------------------------------------------- argument checks
    def _check_backbone(self, backbone: Optional[str]) -> str:
        accepted = known_backbones(self.family)
        if backbone is None:
            return accepted[0]
        if not isinstance(backbone, str) or backbone not in accepted:
            raise ModelArgsError(f"{self.model_id}: backbone={backbone!r} is not a {self.family} backbone; "
                                 f"accepted values: {', '.join(accepted)}")
        return backbone

    def _check_batch_size(self, batch_size: Any) -> int:
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            bs = None
        if bs is None or bs < 1 or isinstance(batch_size, bool) or (isinstance(batch_size, float) and not batch_size.is_integer()):
            raise ModelArgsError(
                f"{self.model_id}: batch_size={batch_size!r}; accepted values: an integer >= 1 (requests with "
                "the same video layout share a left-padded batch; the paper's numbers are batch 1)")
        return bs

    def _resolve(self, backbone):
        """The method with its settings on ``backbone`` (a name before loading, else the Backbone)."""
        from sharp.methods.settings import resolve_method

        try:
            resolved = resolve_method(self.method, backbone, self.retention, **self.method_kwargs)
        except (ValueError, TypeError) as err:
            raise ModelArgsError(f"{self.model_id}: {err}") from None
        eval_logger.info(f"{self.model_id}: {resolved.describe()}")
        self.method_settings = resolved.settings
        return resolved.method

    def _check_unresolved(self) -> None:
        from sharp.methods import make_method

        try:
            make_method(self.method, self.retention, **self.method_kwargs)
        except (ValueError, TypeError) as err:
            raise ModelArgsError(f"{self.model_id}: {err}") from None

    def _check_method(self, method: Optional[str], retention: Any, kwargs: dict):
        from sharp import methods as M

        if self.fixed_method is not None:
            if method is not None and method != self.fixed_method:
                raise ModelArgsError(f"{self.model_id}: method={method!r} conflicts with the model id; accepted "
                                     f"values: {self.fixed_method!r} (or use {self.family_generic_id()} for any method)")
            method = self.fixed_method
        method = method or "vanilla"
        if not isinstance(method, str):
            raise ModelArgsError(f"{self.model_id}: method={method!r}; accepted values: a registered method "
                                 "or several joined by '+' (e.g. fastv+sharp)")
        kwargs = nest_child_kwargs(method, kwargs, who=self.model_id)
        from sharp.harness.catalog import method_status, not_implemented_message

        if method_status(method)[0] == "planned":
            raise ModelArgsError(f"{self.model_id}: " + not_implemented_message(
                method, compose_hint="or several joined by '+', e.g. method=fastv+sharp"))
        try:
            retention = M.check_retention(retention)
        except ValueError as err:
            raise ModelArgsError(f"{self.model_id}: {err}") from None
        if method == "vanilla" and retention != 1.0:
            raise ModelArgsError(f"{self.model_id}: retention={retention} with method 'vanilla'; accepted values: 1 "
                                 "(vanilla keeps every visual token)")
        return method, retention, kwargs

    def _setup_data_parallel(self, backbone_overrides: dict) -> None:
        """Under a data-parallel launcher (WORLD_SIZE > 1): rank and world size from accelerate, one device
        per process (as lmms-eval's built-in wrappers)."""
        from sharp.harness.parallel import world

        w = world()
        if not w.parallel:
            return
        from accelerate import Accelerator

        cpu = backbone_overrides.get("device") == "cpu" or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu)  # the evaluator gathers request counts through it
        # rank and world size as the evaluator computes them (RANK / WORLD_SIZE): accelerate reports a single
        # process for a CPU group that lmms-eval's CLI started without cpu=True
        self._rank, self._world_size = w.rank, w.size
        backbone_overrides["device"] = "cpu" if cpu else f"cuda:{w.local_rank}"
        if w.main:
            eval_logger.info(f"{self.model_id}: data parallel over {w.size} processes "
                             f"({'CPU' if cpu else 'one GPU each'})")

    @classmethod
    def family_generic_id(cls) -> str:
        from sharp.lmms.manifest import FAMILIES

        return FAMILIES[cls.family][0]

    # ---------------------------------------------------------------- lmms interface
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer(self):
        return self.bb.tokenizer

    @property
    def model(self):
        return self.bb.model

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{self.model_id} only generates (the video benchmarks use generate_until)")

    def clean(self) -> None:
        """After an evaluation, what lmms-eval's ``clean`` does (the model's module references dropped, the
        accelerator's state reset, garbage collected, the device cache emptied) with ONE full garbage
        collection instead of its two (``Accelerator.free_memory`` collects, then ``clean`` collects again):
        each walks the whole heap, about 0.4 s a cell where one process runs many cells (a notebook, the
        tests); a cell run by ``run.py`` ends its process anyway."""
        if self.__dict__.get("_frame_folders") is not None:
            self._frame_folders.close()
        for name in list(vars(self)):
            if isinstance(getattr(self, name), torch.nn.Module):
                delattr(self, name)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "free_memory"):
            accelerator.free_memory()  # gc.collect(), then the device's empty_cache
        else:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{self.model_id} does not support multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in request order. Requests are decoded in order and run in batches of one layout."""
        t0 = time.perf_counter()
        out: list[Optional[GenerationResult]] = [None] * len(requests)
        real = []
        for i, req in enumerate(requests):
            if (req.metadata or {}).get("__padding_only__"):  # the evaluator's rank padding: discarded
                out[i] = GenerationResult("", TokenCounts(input_tokens=0, output_tokens=0))
            else:
                real.append((i, req))
        self._loaded, self._failed_here, self._todo = 0, 0, len(real)
        pbar = tqdm(total=len(real), disable=self.rank != 0, desc=f"{self.model_id}:{self.method}@{self.retention:g}")
        batches = LayoutBatches(self._batch_size)
        try:
            for i, req in real:
                item = self._load(i, req)
                if item is None:
                    out[i] = GenerationResult("", TokenCounts(input_tokens=0, output_tokens=0))
                    pbar.update(1)
                    continue
                for batch in batches.add(item):
                    self._run_batch(batch, out)
                    pbar.update(len(batch))
            for batch in batches.drain():
                self._run_batch(batch, out)
                pbar.update(len(batch))
        finally:
            pbar.close()
            self.busy_s += time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- one request
    def _load(self, index: int, req: Instance) -> Optional[_Pending]:
        """Decode a request's video; a video that cannot be used is a failed request (None)."""
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        settings, until = self._gen_settings(gen_kwargs)
        video = None
        try:
            video = self._visual(doc_to_visual, task, split, doc_id)
            frames = self._decode(video)
        except VideoFailure as failure:
            self._fail(task, doc_id, video, str(failure))
            return None
        self._loaded += 1
        return _Pending(index, ctx, task, doc_id, settings, until, frames, video if isinstance(video, str) else None)

    def _visual(self, doc_to_visual, task, split, doc_id):
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        except (OSError, ValueError) as err:  # the task's own check (e.g. a missing file)
            raise VideoFailure(f"{type(err).__name__}: {err}") from None
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1 and isinstance(visuals[0], (list, tuple)):
            visuals = visuals[0]
        if visuals is None or (isinstance(visuals, (list, tuple)) and len(visuals) == 0):
            raise VideoFailure("the request has no video (doc_to_visual returned nothing)")
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1:
            visuals = visuals[0]
        if isinstance(visuals, (list, tuple)):
            raise VideoFailure(f"the request has {len(visuals)} visuals; one video per request is supported")
        if isinstance(visuals, (str, os.PathLike)) and not os.path.exists(visuals):
            raise VideoFailure(f"video file not found: {visuals}")
        return visuals

    def _decode(self, video) -> np.ndarray:
        """The frames the backbone's reference reader gives; any error doing so is a VideoFailure. A frame
        folder (MVBench's TVQA clips) is read as the video of its frames at 3 fps (:mod:`sharp.lmms.frame_folders`)."""
        try:
            if isinstance(video, (str, os.PathLike)) and os.path.isdir(video):
                video = self._frame_folder_videos().video(video)
            return self.bb.sample_frames(video)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - decord, PyAV, VideoError, qwen-vl-utils rules, ...
            text = str(err)
            name = str(video) if isinstance(video, (str, os.PathLike)) else "<frames>"
            reason = text if type(err).__name__ == "VideoError" else f"{type(err).__name__}: {text}"
            if name not in reason:
                reason += f" ({name})"
            raise VideoFailure(reason) from None

    def _frame_folder_videos(self) -> FrameFolderVideos:
        """The temporary videos of frame folders (made on first use, removed by :meth:`clean`)."""
        if self.__dict__.get("_frame_folders") is None:
            self._frame_folders = FrameFolderVideos()
        return self._frame_folders

    def _fail(self, task: str, doc_id: Any, video: Any, reason: str) -> None:
        """Record a failed request (answered ''), or stop: strict, or the first requests all failed."""
        self.failed_requests += 1
        self._failed_here += 1
        self.request_stats.append({"task": task, "doc_id": doc_id, "failed": reason,
                                   "video": str(video) if isinstance(video, (str, os.PathLike)) else None})
        if self.strict:
            raise HarnessError(f"strict=true: {task} doc {doc_id}: {reason}")
        eval_logger.error(f"{self.model_id}: {task} doc {doc_id}: {reason}; answering ''")
        first = min(FAIL_FAST, self._todo)
        if self._loaded == 0 and self._failed_here >= first:
            what = f"the first {first} request(s) all failed" if first < self._todo else f"all {first} request(s) failed"
            if reason.startswith("video file not found"):
                raise MissingResourceError(
                    f"{what}: {reason}\nThe benchmark's videos are not unpacked under HF_HOME; see results/README.md "
                    "('Weights and data') or run `python run.py tasks=...` once with internet.")
            raise HarnessError(f"{what}, last: {task} doc {doc_id}: {reason} (one bad video only costs its "
                               "answer; this looks like the data or the setup)")

    def _gen_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gk = dict(gen_kwargs or {})
        until = gk.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a str or a list of str, got {type(until).__name__}")
        temperature = gk.pop("temperature", 0) or 0
        gk.pop("do_sample", None)
        do_sample = float(temperature) > 0  # greedy unless a temperature is asked for (as the built-ins)
        settings: dict[str, Any] = {
            "max_new_tokens": int(gk.pop("max_new_tokens", None) or self.max_new_tokens_default),
            "do_sample": do_sample,
        }
        if do_sample:
            settings["temperature"] = float(temperature)
        for key in _PASSED_GEN_KWARGS:
            if key in gk:
                value = gk.pop(key)
                if value is not None and (do_sample or key not in _SAMPLING_ONLY):
                    settings[key] = value
        ignored = sorted(set(gk) - self._warned)
        if ignored:
            eval_logger.warning(f"{self.model_id}: ignoring generation kwargs {ignored}")
            self._warned.update(ignored)
        if not do_sample:  # silence "temperature is set but do_sample=False" from checkpoint generation configs
            settings.update(temperature=None, top_p=None, top_k=None)
        return settings, list(until)

    def _run_batch(self, batch: list[_Pending], out: list) -> None:
        while self.warmup > 0:  # untimed, not recorded: kernels and caches before the first timed request
            self.warmup -= 1
            first = batch[0]
            self._generate([first], {**first.settings, "max_new_tokens": 2})
        texts, stats = self._generate(batch)
        for item, text, st in zip(batch, texts, stats):
            st.update(task=item.task, doc_id=item.doc_id)
            self.request_stats.append(st)
            self._log_throughput(st)
            out[item.index] = GenerationResult(text, TokenCounts(input_tokens=st.get("input_tokens"),
                                                                 output_tokens=st.get("output_tokens")))

    def _batch_inputs(self, batch: list[_Pending]) -> dict:
        """Model inputs of a batch of one layout: prepare()'s path for one request; several: per-sample
        pixels, one placeholder count, left-padded prompts (the backbone's tokenizer settings)."""
        if len(batch) == 1:
            return self.bb.pixels_to_inputs(batch[0].frames, batch[0].context)
        pixels = [self.bb.video_pixels(item.frames) for item in batch]
        n = self.bb.n_placeholders(**pixels[0])
        out = self.bb._tokenize([self.bb.build_prompt(item.context, n) for item in batch])  # left padding
        out.update(self.bb.collate_pixels(pixels))
        return self.bb._to_model(out)

    def generate_one(self, video, context: str, gen_kwargs: dict) -> tuple[str, dict]:
        """One request outside lmms-eval (a video path or frames, a prompt): (answer, statistics)."""
        settings, until = self._gen_settings(gen_kwargs)
        item = _Pending(0, context, "", None, settings, until, self._decode(video), None)
        texts, stats = self._generate([item])
        return texts[0], stats[0]

    def _generate(self, batch: list[_Pending], settings: Optional[dict] = None) -> tuple[list[str], list[dict]]:
        import sharp

        settings = dict(batch[0].settings if settings is None else settings)
        until = batch[0].until
        inputs = self._batch_inputs(batch)
        inputs = {k: (v.to(self._device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        n_visual = int(self.bb.layout(inputs).n_visual)
        input_len = int(inputs["input_ids"].shape[1])
        mask = inputs.get("attention_mask")
        lengths = [int(x) for x in mask.sum(dim=1)] if mask is not None else [input_len] * len(batch)
        tok = self.bb.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else eos
        cuda = self._device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        t0 = time.perf_counter()
        with torch.inference_mode(), _Timer(self.bb.model, sync=cuda) as timer, \
                sharp.prune(self.bb, self.pruner) as trace:
            extra = {}
            if eos is not None:
                extra["eos_token_id"] = eos
            if pad is not None:
                extra["pad_token_id"] = pad
            output = self.bb.model.generate(**inputs, use_cache=True, **settings, **extra)
        if cuda:
            torch.cuda.synchronize(self._device)
        generate_s = time.perf_counter() - t0

        measured = [int(x) for x in (getattr(trace, "visual_tokens_per_layer", None) or [])]
        layers = [measured] * len(batch)
        by_sample = getattr(trace, "visual_tokens_by_sample", None) or []  # [layer][sample] (engine)
        if len(batch) > 1 and by_sample and all(len(row) == len(batch) for row in by_sample):
            layers = [[int(row[i]) for row in by_sample] for i in range(len(batch))]
        elif len(batch) > 1 and measured:
            got = per_sample_layers(list(getattr(trace, "kept", None) or []), list(getattr(trace, "stage_layers", None) or []),
                                    measured, n_visual, len(batch))
            if got is None and "per_sample_layers" not in self._warned:
                eval_logger.warning(f"{self.model_id}: per-sample visual tokens of {self.method} could not be "
                                    "rebuilt from trace.kept; every sample of a batch gets sample 0's counts")
                self._warned.add("per_sample_layers")
            layers = got or layers
        stage_ms = {k: 1000.0 * float(v) for k, v in (getattr(trace, "stage_times", None) or {}).items()}
        if cuda:
            peak, kind = torch.cuda.max_memory_allocated(self._device) / 2**20, "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "process_max_rss"
        texts, stats = [], []
        for i in range(len(batch)):
            new_tokens = output[i, input_len:] if output.shape[1] >= input_len else output[i]
            if eos is not None:  # a finished row of a batch goes on with padding: cut after its first eos
                hits = (new_tokens == eos).nonzero()
                if len(hits):
                    new_tokens = new_tokens[: int(hits[0, 0]) + 1]
            text = tok.decode(new_tokens, skip_special_tokens=True)
            for term in until:
                if term and term in text:
                    text = text[: text.index(term)]
            texts.append(text.strip())
            per_layer = layers[i]
            stats.append({
                "visual_tokens_before": n_visual,
                "visual_tokens_after": per_layer[-1] if per_layer else n_visual,
                "visual_tokens_per_layer": per_layer,
                "visual_tokens_layer_mean": statistics.fmean(per_layer) if per_layer else float(n_visual),
                "input_tokens": lengths[i],
                "output_tokens": int(new_tokens.shape[0]),
                "prefill_ms": 1000.0 * timer.prefill_s if timer.prefill_s is not None else None,
                "generate_ms": 1000.0 * generate_s,
                "batch_size": len(batch),
                "prefill_tflops": self._tflops(n_visual, per_layer),
                "prefill_tflops_measured": self._measured_tflops(per_layer),
                "prefill_tflops_exact": self._measured_tflops(per_layer, text_rows=lengths[i] - n_visual,
                                                              convention="exact"),
                "stage_ms": dict(stage_ms),
                "peak_memory_mb": peak,
                "peak_memory_kind": kind,
            })
        return texts, stats

    def _tflops(self, n_visual: int, per_layer: list[int]) -> Optional[float]:
        """Prefill TFLOPs of the method's token schedule; the measured one when the method's kept
        counts depend on the video (``input_dependent_schedule``: FrameFusion, adaptive SharpV)."""
        try:
            from sharp.flops import prefill_tflops

            if self._input_dependent_schedule():
                return self._measured_tflops(per_layer)

            return float(prefill_tflops(self.bb, self.pruner, visual_tokens=n_visual, convention="paper"))
        except Exception as err:  # noqa: BLE001 - a counter gap must not kill an evaluation
            if "tflops" not in self._warned:
                eval_logger.warning(f"{self.model_id}: prefill TFLOPs unavailable for {self.method}: {err}")
                self._warned.add("tflops")
            return None

    def _input_dependent_schedule(self) -> bool:
        """Whether the method's kept counts depend on the video (asked once per wrapper)."""
        return bool(self.pruner.input_dependent_schedule)

    def _measured_tflops(self, per_layer: list[int], text_rows: int = 0, convention: str = "paper") -> Optional[float]:
        """TFLOPs of the rows each layer really processed: the visual tokens (paper convention), or with
        ``text_rows`` and ``convention="exact"`` every row the LLM computes (text included; SwiGLU, GQA,
        causal attention), as ``scripts/bench_prefill.py``'s sequence FLOPs."""
        try:
            from sharp.flops import lm_dims, schedule_tflops

            dims = lm_dims(self.bb)
            if len(per_layer) != dims.num_layers:
                return None
            return float(schedule_tflops([n + text_rows for n in per_layer], dims, convention))
        except Exception:  # noqa: BLE001
            return None

    def _log_throughput(self, stats: dict) -> None:
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # pragma: no cover
            return
        gen_s = (stats.get("generate_ms") or 0.0) / 1000.0
        n_out = stats.get("output_tokens") or 0
        extra = {k: stats[k] for k in ("visual_tokens_before", "visual_tokens_after", "prefill_ms",
                                       "prefill_tflops", "peak_memory_mb") if isinstance(stats.get(k), (int, float))}
        log_metrics(total_elapsed_time=gen_s, total_gen_tokens=n_out,
                    avg_speed=(n_out / gen_s if gen_s > 0 else 0.0), additional_metrics=extra)


class SharpLlavaOneVision(SharpVideoLMM):
    family = "llava_onevision"
    model_id = "sharp_llava_onevision"
    default_max_new_tokens = 1024
    builtin_name = "llava_onevision"


class SharpQwen2VL(SharpVideoLMM):
    family = "qwen2_vl"
    model_id = "sharp_qwen2_vl"
    default_max_new_tokens = 128
    builtin_name = "qwen2_vl"


class SharpLlavaVideo(SharpVideoLMM):
    family = "llava_video"
    model_id = "sharp_llava_video"
    default_max_new_tokens = 1024
    builtin_name = "llava_vid"


class SharpQwen2_5VL(SharpVideoLMM):
    family = "qwen2_5_vl"
    model_id = "sharp_qwen2_5_vl"
    default_max_new_tokens = 128
    builtin_name = "qwen2_5_vl"


class SharpQwen3VL(SharpVideoLMM):
    family = "qwen3_vl"
    model_id = "sharp_qwen3_vl"
    default_max_new_tokens = 128
    builtin_name = "qwen3_vl"


_GENERIC = {"SharpLlavaOneVision": SharpLlavaOneVision, "SharpQwen2VL": SharpQwen2VL,
            "SharpLlavaVideo": SharpLlavaVideo, "SharpQwen2_5VL": SharpQwen2_5VL, "SharpQwen3VL": SharpQwen3VL}
_CACHE: dict[str, type] = {}


def method_class(family_cls: type, method: str) -> type:
    """The per-method class ``<FamilyClass>__<method>`` (model id ``<family>_<method>``)."""
    name = f"{family_cls.__name__}__{method}"
    if name not in _CACHE:
        _CACHE[name] = type(name, (family_cls,), {
            "fixed_method": method,
            "model_id": f"{family_cls.family}_{method}",
            "__module__": __name__,
            "__doc__": f"{family_cls.family} with pruning method {method!r} (retention and method kwargs in model_args).",
        })
    return _CACHE[name]


def __getattr__(name: str):  # PEP 562: per-method classes are made on first access
    base, sep, method = name.partition("__")
    if sep and base in _GENERIC and method:
        return method_class(_GENERIC[base], method)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
