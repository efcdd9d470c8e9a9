"""A method from an outside package, exactly as a researcher would add one (docs/adding_a_method.md):
one method file and a ``pyproject.toml`` with a ``sharp.methods`` entry point, pip-installed into a
folder of its own, no yaml. ``python run.py method=<its name>`` runs it (a new interpreter with the
folder on PYTHONPATH), and it goes through the invariant tests over all methods (tests/test_methods.py)
and the method-API walk (tests/test_method_api.py) here, found by the registry through its entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "plugin_fastv_k1"

METHOD_FILE = '''\
"""FastV with K = 1, from outside the harness: keep the visual tokens the last token attends to most
in layer 0's map, before layer 1 (FastV's Sec. 3 with its K set to 1)."""
from dataclasses import dataclass

from sharp import ScorerMethod, layer_kwarg


@dataclass
class FastVK1(ScorerMethod):
    name = "{name}"
    layer: int = layer_kwarg(1, scaling="fixed")  # K: the first layer that sees the pruned sequence

    def stages(self, num_layers):
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"{name}: layer must be in 1..{{num_layers - 1}}, got {{self.layer}}")
        return [self.layer]

    def score_layers(self, num_layers):
        return [self.layer - 1]

    def score(self, ctx):  # (b, n_max): the last row of layer K-1's map, at the current visual tokens
        return ctx.gather_visual(ctx.last_token_attention(layer=self.layer - 1))
'''.format(name=NAME)

PYPROJECT = f'''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "sharp-plugin-example"
version = "0.1.0"
dependencies = []

[project.entry-points."sharp.methods"]
{NAME} = "sharp_plugin_example:FastVK1"

[tool.setuptools]
py-modules = ["sharp_plugin_example"]
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The package pip-installed into its own folder (the test environment itself is not changed); a
    process with it on PYTHONPATH sees its entry point like any installed distribution's."""
    base = tmp_path_factory.mktemp("plugin")
    src, site = base / "src", base / "site"
    src.mkdir()
    (src / "sharp_plugin_example.py").write_text(METHOD_FILE)
    (src / "pyproject.toml").write_text(PYPROJECT)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert any(site.glob("sharp_plugin_example-0.1.0.dist-info/entry_points.txt"))
    return site


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_outside_method_runs_from_run_py(plugin_site, tmp_path):
    """``python run.py method=<its name>``: no yaml, defaults from its dataclass; 32 of 128 kept."""
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "run.py", f"method={NAME}", "backbone=toy_llava_onevision",
                          "retention=0.25", "limit=4", f"results_dir={out}"],
                         cwd=ROOT, env=_env(plugin_site), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"[sharp] settings: {NAME} on toy_llava_onevision (4 layers): the paper's defaults; " \
           "stages before layer(s) 1" in run.stdout
    summary = json.loads((out / "toy_llava_onevision" / NAME / "r0.25" / "summary.json").read_text())
    assert summary["requests"] == 4 and summary["failed_requests"] == 0
    assert summary["tokens"]["visual_before"] == 128 and summary["tokens"]["visual_after"] == 32
    assert summary["method_settings"]["kwargs"] == {"retention": 0.25, "positions": "original", "layer": 1}


@pytest.fixture
def plugin_registered(plugin_site):
    """This interpreter sees the installed package (its folder on sys.path, as PYTHONPATH gives it to a
    new one): the registry finds its entry point; both are undone afterwards."""
    from sharp.methods import registry

    sys.path.insert(0, str(plugin_site))
    registry.entry_point_methods.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(plugin_site))
        registry.entry_point_methods.cache_clear()
        assert NAME not in registry.method_names()


def test_outside_method_passes_the_invariants_over_all_methods(plugin_registered):
    """The invariants every method goes through (tests/test_methods.py: trace = schedule, retention 1
    identity, decode = masked no-cache reference on both tiny backbones at batch 1 and 2, bad kwargs and
    a layer outside the model fail before any forward) and the method-API walk (tests/test_method_api.py),
    on the method found by its registered name."""
    import test_method_api
    import test_methods

    import sharp

    assert NAME in sharp.method_names() and sharp.get_method_class(NAME).__module__ == "sharp_plugin_example"
    for bb_name in test_methods.BACKBONES:
        test_methods.test_trace_follows_token_schedule(bb_name, NAME, {})
        test_methods.test_full_retention_is_identity(bb_name, NAME, {})
        for batch in (1, 2):
            test_methods.test_decode_equals_masked_no_cache_reference(bb_name, batch, NAME, {})
    test_methods.test_bad_kwargs_fail_when_made(NAME)
    test_methods.test_layer_outside_the_model_fails_before_any_forward(NAME)
    module = next(p for p in test_method_api.method_module_paths() if p.name == "sharp_plugin_example.py")
    test_method_api.test_method_module_uses_only_the_method_api(module)


def test_entry_points_missing_from_the_install_are_one_error(monkeypatch):
    """An editable install older than pyproject.toml (a method added, `pip install -e .` not rerun) is
    refused with what to do, never run with a method silently missing."""
    from sharp.methods import registry

    monkeypatch.setattr(registry, "_checkout_entry_points", lambda: {"newmethod": "baselines.newmethod:New"})
    registry.entry_point_methods.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"lack newmethod that pyproject.toml lists: install the project "
                                               r"again \(pip install -e \. from the checkout"):
            registry.entry_point_methods()
    finally:
        monkeypatch.undo()
        registry.entry_point_methods.cache_clear()
    assert "fastv" in registry.entry_point_methods()
