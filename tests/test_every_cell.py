"""Every registered method runs on every shipped offline backbone from its defaults alone.

The matrix is ``sharp.method_names()`` x the backbone configs that load offline (``configs/backbone/``
without a hub id: the tiny random-weight and the trained toy backbones of both families), so a newly
registered method or a new backbone config joins it without editing this file.

- ``sharp.prune(bb, method, retention)`` with no kwargs: the trace's per-layer visual tokens equal the
  token schedule of the method resolved from the backbone's NAME (``sharp.resolve_method``, which reads
  only the config file): what the loaded model ran is what the settings printed before loading said.
- ``run.py method=M backbone=B limit=2`` (in-process ``run_cell``, the same code path; one subprocess
  case is in tests/test_harness_run.py): finishes, records the resolved settings in its summary, and the
  summary's "visual tokens kept" is the method's schedule (measured counts for methods whose counts
  depend on the video). The cells share one loaded model per backbone and one lmms-eval task index.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import yaml

import sharp
from sharp.harness.config import CONFIG_DIR, compose

from lmms_helpers import memoised_task_index

METHODS = [m for m in sharp.method_names() if not m.startswith("_")]


def offline_backbones() -> list[str]:
    """Backbone configs with no hub checkpoint (random-weight or shipped weights)."""
    out = []
    for path in sorted((CONFIG_DIR / "backbone").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("hub_id") is None:
            out.append(cfg["name"])
    return out


BACKBONES = offline_backbones()


def default_retention(method: str) -> float:
    """What ``python run.py method=M`` runs at: the method config's default retention, or (no yaml, or
    none in it) the dataclass's ``retention`` default, as the generated config has it."""
    path = CONFIG_DIR / "method" / f"{method}.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else {}
    if "default_retention" in config:
        return float(config["default_retention"])
    from sharp.harness.method_configs import default_retention as dataclass_default
    from sharp.methods.registry import get_method_class

    return float(dataclass_default(get_method_class(method)))


def test_the_matrix_covers_both_families_tiny_and_toy():
    assert {"tiny_llava_onevision", "tiny_qwen2_vl", "toy_llava_onevision", "toy_qwen2_vl"} <= set(BACKBONES)
    assert len(METHODS) >= 11


_LOADED: dict = {}


def loaded(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _LOADED:
        _LOADED[key] = _original_load(name, **overrides)
    return _LOADED[key]


_original_load = sharp.load_backbone


def expected_schedule(resolved, n_visual: int, num_layers: int) -> list[int]:
    return resolved.method.token_schedule(n_visual, num_layers, backbone=resolved.backbone.name)


def check_measured(per_layer: list[int], n_visual: int, method: str) -> None:
    """A video-dependent schedule never grows and ends below the input count."""
    assert all(b <= a for a, b in zip(per_layer, per_layer[1:])), per_layer
    assert per_layer[-1] < n_visual or method == "vanilla", per_layer


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_prune_runs_from_defaults(method, backbone):
    bb = loaded(backbone, device="cpu")
    retention = default_retention(method)
    inputs = bb.synthetic_inputs(frames=8, seed=5)
    n_visual = bb.layout(inputs).n_visual
    with torch.no_grad(), sharp.prune(bb, method, retention) as trace:
        bb.model(**inputs)  # the prefill (decode steps: tests/test_methods.py)
    resolved = sharp.resolve_method(method, backbone, retention)  # from the config file, no model
    per_layer = list(trace.visual_tokens_per_layer)
    assert len(per_layer) == bb.num_layers
    if resolved.method.input_dependent_schedule:
        check_measured(per_layer, n_visual, method)
    else:
        assert per_layer == expected_schedule(resolved, n_visual, bb.num_layers)


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, monkeypatch_module, task_index_memo):
    """run_cell in-process with one loaded model per backbone and one lmms-eval task index."""
    monkeypatch_module.setattr(sharp, "load_backbone", loaded)
    with memoised_task_index(memo=task_index_memo):
        yield tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_run_py_cell_runs_from_defaults(method, backbone, run_env, capsys):
    from sharp.harness.runner import run_cell

    summary = run_cell(compose([f"method={method}", f"backbone={backbone}", "limit=2", f"results_dir={run_env}",
                                "bootstrap_iters=0", "device=cpu"]))
    printed = capsys.readouterr().out
    retention = default_retention(method)
    resolved = sharp.resolve_method(method, backbone, retention)
    assert summary["status"] == "finished" and summary["requests"] == 2 and summary["failed_requests"] == 0
    # the settings that ran are printed before the model loads and written to the summary
    assert f"[sharp] settings: {resolved.describe()}" in printed
    assert summary["method_settings"]["kwargs"] == resolved.settings
    assert summary["method_settings"]["changes"] == resolved.changes
    requests = [r for r in _requests(run_env, backbone, method, retention)]
    n_visual = requests[0]["visual_tokens_before"]
    num_layers = summary["method_settings"]["num_layers"]
    if resolved.method.input_dependent_schedule:
        for r in requests:
            check_measured(r["visual_tokens_per_layer"], n_visual, method)
    else:
        kept = expected_schedule(resolved, n_visual, num_layers)[-1]
        assert summary["tokens"]["visual_after"] == kept
        assert f"visual tokens kept  {kept} of {n_visual}" in printed
    assert summary["tokens"]["visual_after"] == statistics.fmean(r["visual_tokens_after"] for r in requests)
    # both FLOPs conventions on the measured schedule: the exact one counts every row the LLM computed
    dims = sharp.flops.lm_dims(backbone)
    exact = [sharp.flops.schedule_tflops([v + r["input_tokens"] - n_visual for v in r["visual_tokens_per_layer"]],
                                         dims, "exact") for r in requests]
    assert [r["prefill_tflops_exact"] for r in requests] == pytest.approx(exact)
    assert summary["tflops"]["exact_sequence_mean"] == pytest.approx(statistics.fmean(exact))


def _requests(root: Path, backbone: str, method: str, retention: float) -> list[dict]:
    import json

    from sharp.harness.cells import Cell, REQUESTS

    cell = Cell(backbone=backbone, method=method, retention=retention, tasks=[])
    return [json.loads(line) for line in (cell.dir(root) / REQUESTS).read_text().splitlines()]
