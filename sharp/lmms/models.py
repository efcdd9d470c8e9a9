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
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Optional

import torch
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from sharp.harness.resources import HarnessError, MissingResourceError, explain  # noqa: F401
from sharp.lmms.args import ModelArgsError, nest_child_kwargs

# Arguments that go to sharp.load_backbone when given (``pretrained``, lmms-eval's name, = ``checkpoint``).
_BACKBONE_ARGS = ("pretrained", "checkpoint", "dtype", "attn_implementation", "num_frames", "random_weights",
                  "max_pixels", "min_pixels")
# Generation kwargs (from the task yaml or --gen_kwargs) that are passed on to generate().
_PASSED_GEN_KWARGS = ("num_beams", "top_p", "top_k", "repetition_penalty", "length_penalty", "min_new_tokens")
_SAMPLING_ONLY = ("top_p", "top_k")


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
                 **kwargs) -> None:
        super().__init__()
        kwargs = {k: _coerce(v) for k, v in kwargs.items()}
        backbone_overrides = {k: kwargs.pop(k) for k in _BACKBONE_ARGS if k in kwargs}
        backbone_overrides = {k: v for k, v in backbone_overrides.items() if v is not None}
        if "pretrained" in backbone_overrides:
            backbone_overrides["checkpoint"] = backbone_overrides.pop("pretrained")
        self.backbone_name = self._check_backbone(_coerce(backbone))
        self.method, self.retention, self.method_kwargs = self._check_method(_coerce(method), retention, kwargs)
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            bs = None
        if bs != 1:
            raise ModelArgsError(
                f"{self.model_id}: batch_size={batch_size!r} is not supported; accepted values: 1 "
                "(pruning runs use batch 1, like the paper's numbers)")
        self.max_new_tokens_default = int(max_new_tokens) if max_new_tokens else self.default_max_new_tokens
        if seed is not None:
            torch.manual_seed(int(seed))
        if device not in (None, "None") and device != "auto":
            backbone_overrides.setdefault("device", device)
        self.backbone_overrides = backbone_overrides
        self.warmup = int(warmup or 0)  # untimed generate()s before the first request (kernels, caches)
        self.request_stats: list[dict] = []
        self.failed_requests = 0
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

    # ---------------------------------------------------------------- argument checks
    def _check_backbone(self, backbone: Optional[str]) -> str:
        accepted = known_backbones(self.family)
        if backbone is None:
            return accepted[0]
        if not isinstance(backbone, str) or backbone not in accepted:
            raise ModelArgsError(f"{self.model_id}: backbone={backbone!r} is not a {self.family} backbone; "
                                 f"accepted values: {', '.join(accepted)}")
        return backbone

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
        try:
            M.make_method(method, retention, **kwargs)
        except (ValueError, TypeError) as err:
            raise ModelArgsError(f"{self.model_id}: {err}") from None
        return method, retention, kwargs

    @classmethod
    def family_generic_id(cls) -> str:
        from sharp.lmms.manifest import FAMILIES

        return FAMILIES[cls.family][0]

    # ---------------------------------------------------------------- lmms interface
    @property
    def batch_size(self) -> int:
        return 1

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

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{self.model_id} does not support multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc=f"{self.model_id}:{self.method}@{self.retention:g}"):
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visual = self._visual(doc_to_visual, task, split, doc_id)
            while self.warmup > 0:
                self.warmup -= 1
                failed = self.failed_requests
                self.generate_one(visual, ctx, {**(gen_kwargs or {}), "max_new_tokens": 2})
                self.failed_requests = failed
            text, stats = self.generate_one(visual, ctx, gen_kwargs)
            stats.update(task=task, doc_id=doc_id)
            self.request_stats.append(stats)
            self._log_throughput(stats)
            out.append(GenerationResult(text, TokenCounts(input_tokens=stats.get("input_tokens"),
                                                          output_tokens=stats.get("output_tokens"))))
        return out

    # ---------------------------------------------------------------- one request
    def _visual(self, doc_to_visual, task, split, doc_id):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1 and isinstance(visuals[0], (list, tuple)):
            visuals = visuals[0]
        if visuals is None or (isinstance(visuals, (list, tuple)) and len(visuals) == 0):
            return None
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1:
            visuals = visuals[0]
        if isinstance(visuals, str):
            import os

            if not os.path.exists(visuals):
                raise MissingResourceError(
                    f"video of task {task} doc {doc_id} not found: {visuals}\n"
                    "The benchmark's videos are not unpacked under HF_HOME; see results/README.md "
                    "('Weights and data') or run `python run.py tasks=...` once with internet.")
        return visuals

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

    def generate_one(self, visual, context: str, gen_kwargs: dict) -> tuple[str, dict]:
        import sharp

        settings, until = self._gen_settings(gen_kwargs)
        try:
            inputs = self.bb.prepare(visual, context)
        except Exception as err:  # noqa: BLE001 - a video that exists but does not decode
            mod = type(err).__module__ or ""
            if isinstance(visual, str) and (mod.startswith("decord") or mod.startswith("av")):
                eval_logger.error(f"{self.model_id}: failed to decode {visual}: {err}; answering ''")
                self.failed_requests += 1
                return "", {"failed": f"{type(err).__name__}: {err}"}
            raise
        inputs = {k: (v.to(self._device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        n_visual = int(self.bb.layout(inputs).n_visual)
        input_len = int(inputs["input_ids"].shape[1])
        tok = self.bb.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else eos
        cuda = self._device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        t0 = time.perf_counter()
        with torch.inference_mode(), _Timer(self.bb.model, sync=cuda) as timer, \
                sharp.prune(self.bb, method=self.method, retention=self.retention, **self.method_kwargs) as trace:
            extra = {}
            if eos is not None:
                extra["eos_token_id"] = eos
            if pad is not None:
                extra["pad_token_id"] = pad
            output = self.bb.model.generate(**inputs, use_cache=True, **settings, **extra)
        if cuda:
            torch.cuda.synchronize(self._device)
        generate_s = time.perf_counter() - t0
        new_tokens = output[0, input_len:] if output.shape[1] >= input_len else output[0]
        text = tok.decode(new_tokens, skip_special_tokens=True)
        for term in until:
            if term and term in text:
                text = text[: text.index(term)]
        text = text.strip()

        per_layer = [int(x) for x in (getattr(trace, "visual_tokens_per_layer", None) or [])]
        after = per_layer[-1] if per_layer else n_visual
        stats = {
            "visual_tokens_before": n_visual,
            "visual_tokens_after": after,
            "visual_tokens_per_layer": per_layer,
            "visual_tokens_layer_mean": statistics.fmean(per_layer) if per_layer else float(n_visual),
            "input_tokens": input_len,
            "output_tokens": int(new_tokens.shape[0]),
            "prefill_ms": 1000.0 * timer.prefill_s if timer.prefill_s is not None else None,
            "generate_ms": 1000.0 * generate_s,
            "prefill_tflops": self._tflops(n_visual),
            "prefill_tflops_measured": self._measured_tflops(per_layer),
            "stage_ms": {k: 1000.0 * float(v) for k, v in (getattr(trace, "stage_times", None) or {}).items()},
        }
        if cuda:
            stats["peak_memory_mb"] = torch.cuda.max_memory_allocated(self._device) / 2**20
            stats["peak_memory_kind"] = "cuda_max_allocated"
        else:
            stats["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            stats["peak_memory_kind"] = "process_max_rss"
        return text, stats

    def _tflops(self, n_visual: int) -> Optional[float]:
        try:
            from sharp.flops import prefill_tflops

            return float(prefill_tflops(self.bb, self.method, self.retention, visual_tokens=n_visual,
                                        convention="paper", **self.method_kwargs))
        except Exception as err:  # noqa: BLE001 - a counter gap must not kill an evaluation
            if "tflops" not in self._warned:
                eval_logger.warning(f"{self.model_id}: prefill TFLOPs unavailable for {self.method}: {err}")
                self._warned.add("tflops")
            return None

    def _measured_tflops(self, per_layer: list[int]) -> Optional[float]:
        """Paper-convention TFLOPs of the visual tokens each layer really processed (adaptive methods)."""
        try:
            from sharp.flops import lm_dims, schedule_tflops

            dims = lm_dims(self.bb)
            if len(per_layer) != dims.num_layers:
                return None
            return float(schedule_tflops(per_layer, dims, "paper"))
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


_GENERIC = {"SharpLlavaOneVision": SharpLlavaOneVision, "SharpQwen2VL": SharpQwen2VL}
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
