"""summary.json: config, provenance, scores and efficiency numbers of one finished cell."""
from __future__ import annotations

import platform
import socket
import statistics
import subprocess
from importlib import metadata
from typing import Any, Iterable, Optional

from sharp.harness.benchmarks import average, extract_scores

SUMMARY_FORMAT = 1
_PACKAGES = ("sharp-prune", "torch", "transformers", "lmms_eval", "accelerate", "datasets", "huggingface_hub",
             "hydra-core", "omegaconf", "decord", "av", "numpy", "flash-attn", "qwen-vl-utils")


def package_versions(names: Iterable[str] = _PACKAGES) -> dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform()}
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
        else:
            info["gpu"] = None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def git_info(repo: str) -> dict:
    """Commit and dirty flag of the checkout (read-only git calls); None where git has nothing."""
    def run(*args: str) -> Optional[str]:
        try:
            res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    porcelain = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": (bool(porcelain) if porcelain is not None else None)}


def _mean(values: list) -> Optional[float]:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.fmean(values) if values else None


def _median(values: list) -> Optional[float]:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(values) if values else None


def aggregate_requests(rows: list[dict]) -> dict:
    """Means over the requests (visual tokens, prefill ms/TFLOPs, stage ms) and the peak memory."""
    ok = [r for r in rows if "failed" not in r]
    before = _mean([r.get("visual_tokens_before") for r in ok])
    after = _mean([r.get("visual_tokens_after") for r in ok])
    stage_keys = sorted({k for r in ok for k in (r.get("stage_ms") or {})})
    peaks = [r.get("peak_memory_mb") for r in ok if isinstance(r.get("peak_memory_mb"), (int, float))]
    return {
        "requests": len(rows),
        "failed_requests": len(rows) - len(ok),
        "tokens": {
            "visual_before": before,
            "visual_after": after,
            "visual_layer_mean": _mean([r.get("visual_tokens_layer_mean") for r in ok]),
            "retention_measured": (after / before) if before else None,
            "input_tokens": _mean([r.get("input_tokens") for r in ok]),
            "output_tokens": _mean([r.get("output_tokens") for r in ok]),
        },
        "tflops": {"prefill_mean": _mean([r.get("prefill_tflops") for r in ok]),  # method's token schedule
                   "measured_mean": _mean([r.get("prefill_tflops_measured") for r in ok]),  # trace per layer
                   "convention": "paper",
                   # every row the LLM computed (text included; SwiGLU, GQA, causal): sharp.flops "exact"
                   "exact_sequence_mean": _mean([r.get("prefill_tflops_exact") for r in ok])},
        "latency_ms": {
            "prefill_mean": _mean([r.get("prefill_ms") for r in ok]),
            "prefill_median": _median([r.get("prefill_ms") for r in ok]),
            "generate_mean": _mean([r.get("generate_ms") for r in ok]),
        },
        "stage_ms": {k: _mean([(r.get("stage_ms") or {}).get(k) for r in ok]) for k in stage_keys},
        "peak_memory_mb": max(peaks) if peaks else None,
        "peak_memory_kind": next((r.get("peak_memory_kind") for r in ok if r.get("peak_memory_kind")), None),
    }


def task_of(request_task: str, tasks: Iterable[str]) -> str:
    """Map an lmms-eval subtask (mvbench_action_count) to the requested task/group (mvbench)."""
    for t in tasks:
        if request_task == t or request_task.startswith(t + "_"):
            return t
    return request_task


def build_summary(*, cell_key: dict, config: dict, results: dict, samples: Optional[dict], requests: list[dict],
                  repo: str, files: dict, started: str, finished: str, wall_s: float, extra: Optional[dict] = None) -> dict:
    scores, metrics = extract_scores(results, samples)
    overall = aggregate_requests(requests)
    by_task: dict[str, list] = {}
    for r in requests:
        by_task.setdefault(task_of(str(r.get("task")), cell_key.get("tasks", [])), []).append(r)
    failures = [{"task": r.get("task"), "doc_id": r.get("doc_id"), "reason": r.get("failed"),
                 **({"video": r["video"]} if r.get("video") else {})} for r in requests if "failed" in r]
    summary = {
        "format": SUMMARY_FORMAT,
        "status": "finished",
        "cell": cell_key,
        "scores": scores,
        "avg_score": average(scores),
        "metrics": metrics,
        "n_samples": {t: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                      for t, v in (results.get("n-samples") or {}).items()},
        **overall,
        "failures": failures,  # requests whose video could not be used: answered '' (scored as wrong)
        "per_task": {t: aggregate_requests(rows) for t, rows in sorted(by_task.items())},
        "config": config,
        "git": git_info(repo),
        "versions": package_versions(),
        "device": device_info(),
        "files": files,
        "started": started,
        "finished": finished,
        "wall_s": wall_s,
    }
    if extra:
        summary.update(extra)
    return summary
