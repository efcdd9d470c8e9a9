"""sharp.resolve_method: a method's defaults on a backbone (depth-mapped layers, automatic positions,
per-backbone config values, user kwargs untouched) and the errors it raises before a model loads."""
from __future__ import annotations

import sys

import pytest

import sharp
from sharp.harness.config import REPO_ROOT, compose, method_kwargs
from sharp.harness.catalog import method_configs


def rounded(layer: int, depth: int) -> int:
    """The documented rule, written out: round(l x L / 28), halves up."""
    return int(layer * depth / 28 + 0.5)


@pytest.mark.parametrize("backbone,depth", [("toy_llava_onevision", 4), ("mid_qwen2_vl", 16),
                                            ("llava_onevision_7b", 28)])
def test_relative_layers_follow_the_depth_and_fixed_ones_stay(backbone, depth):
    pdrop = sharp.resolve_method("pdrop", backbone, 0.25).method
    assert list(pdrop.stage_layers) == [rounded(k, depth) for k in (4, 16, 24)]  # 4: [1, 2, 3]; 16: [2, 9, 14]
    assert sharp.resolve_method("holitom", backbone, 0.15).method.llm_layer == rounded(18, depth)
    combo = sharp.resolve_method("holitom_sharp", backbone, 0.15).method
    assert combo.children[1].layer == rounded(18, depth) and combo.children[0].llm_layer is None
    assert sharp.resolve_method("fastv", backbone, 0.25).method.layer == 2  # FastV's K by index
    assert sharp.resolve_method("sharp", backbone, 0.25).method.layer == 1  # the first decoder layer


def test_stage_lists_stay_strictly_increasing_and_user_values_are_never_mapped():
    from sharp.engine.method import LayerRule

    assert LayerRule("relative").map([4, 5, 6], 4) == [1, 2, 3]  # all three would round to 1
    with pytest.raises(ValueError, match="do not fit"):
        LayerRule("relative").map([4, 16, 24], 3)
    assert LayerRule("fixed").map(2, 2) == 1  # clamped into 1..L-1
    made = sharp.resolve_method("pdrop", "toy_llava_onevision", 0.25, layers=[2, 3])
    assert list(made.method.layers) == [2, 3] and not any("layers" in c for c in made.changes)
    with pytest.raises(ValueError, match=r"every stage layer must be in 1\.\.3"):
        sharp.resolve_method("pdrop", "toy_llava_onevision", 0.25, layers=[4, 16, 24])


def test_positions_auto_is_official_on_1d_rope_and_original_on_mrope():
    for name in ("pdrop", "visionzip", "holitom"):
        assert sharp.resolve_method(name, "tiny_llava_onevision", 0.25).method.positions == "compact"
        assert sharp.resolve_method(name, "tiny_qwen2_vl", 0.25).method.positions == "original"
    assert sharp.resolve_method("fastv", "tiny_llava_onevision", 0.25).method.positions == "original"
    with pytest.raises(ValueError, match="positions='compact' needs 1-D RoPE"):
        sharp.resolve_method("visionzip", "toy_qwen2_vl", 0.2, positions="compact")
    with pytest.raises(ValueError, match="positions='compact' needs 1-D RoPE"):
        sharp.resolve_method("visionzip_sharp", "toy_qwen2_vl", 0.2, visionzip={"positions": "compact"})


def test_vision_layers_fit_the_tower_and_per_backbone_config_values_apply():
    # Qwen2-VL's port layer -2 on a 1-block tower is its only block; LLaVA-OV's port reads the feature layer
    assert sharp.resolve_method("visionzip", "mid_qwen2_vl", 0.2).method.vision_layer == 0
    assert sharp.resolve_method("visionzip", "qwen2_vl_7b", 0.2).method.vision_layer == -2
    assert sharp.resolve_method("visionzip", "mid_llava_onevision", 0.2).method.vision_layers() == ["feature"]
    with pytest.raises(ValueError, match="vision layer -3 is outside"):
        sharp.resolve_method("visionzip", "mid_qwen2_vl", 0.2, vision_layer=-3)
    # configs/method/framefusion.yaml: the official Qwen2-VL threshold; an explicit value wins
    assert sharp.resolve_method("framefusion", "qwen2_vl_7b", 0.3).method.similarity_lower_bound == 0.5
    assert sharp.resolve_method("framefusion", "llava_onevision_7b", 0.3).method.similarity_lower_bound == 0.6
    explicit = sharp.resolve_method("framefusion", "toy_qwen2_vl", 0.3, similarity_lower_bound=0.7)
    assert explicit.method.similarity_lower_bound == 0.7


def test_an_instance_keeps_its_layers_and_gets_its_automatic_settings():
    made = sharp.make_method("pdrop", 0.25, layers=[1, 3])
    resolved = sharp.resolve_method(made, "tiny_qwen2_vl").method
    assert resolved is not made and made.positions == "auto"
    assert resolved.positions == "original" and list(resolved.layers) == [1, 3]
    fixed = sharp.make_method("fastv", 0.25, positions="original")
    assert sharp.resolve_method(fixed, "tiny_qwen2_vl").method is fixed


@pytest.mark.parametrize("name", sorted(method_configs()))
def test_method_configs_repeat_the_method_defaults(name):
    """configs/method/<m>.yaml's kwargs are the method's defaults: a run sets nothing by default."""
    if name == "compose":
        pytest.skip("the generic composition has no defaults of its own")
    assert method_kwargs(compose([f"method={name}"])) == {}


def test_run_py_refuses_explicit_compact_on_mrope_before_loading(capsys, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT))
    import run

    monkeypatch.setattr(sharp, "load_backbone", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exc:
        run.run_in_process(["method=visionzip", "backbone=toy_qwen2_vl", "+method_kwargs.positions=compact",
                            "results_dir=/nonexistent/never-written"])
    assert exc.value.code == 2
    proc = capsys.readouterr()
    lines = [line for line in proc.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: method 'visionzip' on toy_qwen2_vl (4 decoder layers): visionzip: "
                                                    "positions='compact' needs 1-D RoPE")
    assert "Traceback" not in proc.err and "running" not in proc.out
