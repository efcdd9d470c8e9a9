"""The method API is the only way into the engine: every method module (``baselines/``, ShaRP's own
modules, and any registered outside package's) is walked as an AST and fails on

* an import of a ``sharp`` module outside the public method API (``sharp``, the contract
  ``sharp.engine.method``, ShaRP's sibling components under ``sharp.methods``, ``sharp.paths``,
  ``sharp.flops``), of the other engine modules, the backbones, the harness, or of ``transformers``;
* an attribute that reaches past the contexts: the raw sequence (``ctx.seq``, ``.sequence``), the
  engine objects behind a context (``_runner``, ``_session``), the loaded backbone (``ctx.backbone``:
  methods get ``backbone_name``, ``backbone_family`` and named operations) or an HF module of it
  (``.layers``, ``.self_attn``, ``.model``, ...).

The named operations these modules use instead are in docs/engine_api.md.
"""
from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

import sharp

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_SHARP = ("sharp", "sharp.engine.method", "sharp.paths", "sharp.flops")
ALLOWED_PREFIXES = ("sharp.methods.",)  # ShaRP's components (segm, posc, regd, scorer) and the registry's names
FORBIDDEN_ATTRIBUTES = {
    "seq": "the raw sequence state (use ctx.visual_tokens / visual_positions / gather_visual ...)",
    "sequence": "the raw sequence state",
    "_runner": "the engine behind a StageContext",
    "_session": "the engine behind a SessionContext",
    "backbone": "the loaded backbone (use ctx.backbone_name / backbone_family and the named operations)",
    "layers": "a backbone's decoder layers (use ctx.watch_layers)",
    "self_attn": "an HF attention module (use ctx.kv_bytes / last_token_attention)",
    "model": "the HF model (use ctx.model_identity)",
    "language_model": "the HF language model",
    "vision_tower": "the HF vision tower (use ctx.vision)",
    "visual": "the HF vision tower (use ctx.vision)",
    "text_config": "the HF config (use ctx.has_kv_cache and the named facts)",
    "rotary_emb": "the HF RoPE module",
}


def method_module_paths() -> list[Path]:
    """The file of every registered method's class and of the modules next to it in its package
    (ShaRP's components, a baseline's helpers), plus every file of ``baselines/``."""
    paths = set((ROOT / "baselines").glob("*.py"))
    for name in sharp.method_names():
        cls = sharp.get_method_class(name)
        if cls.__module__ in ("sharp.engine.compose",) or name.startswith("_"):
            continue  # a declared composition (no module of its own); test-only methods
        paths.add(Path(inspect.getfile(cls)).resolve())
    methods_dir = ROOT / "sharp" / "methods"
    paths |= {p for p in methods_dir.glob("*.py") if p.name not in ("__init__.py", "registry.py", "settings.py")}
    return sorted(paths)


def imports_of(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "sharp":  # `from sharp import flops` imports a module
                out += [(node.lineno, f"sharp.{alias.name}") for alias in node.names
                        if (ROOT / "sharp" / alias.name).with_suffix(".py").is_file()
                        or (ROOT / "sharp" / alias.name).is_dir()]
    return out


def violations(path: Path) -> list[str]:
    """What the module at ``path`` does that the method API does not allow (one line each)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for line, module in imports_of(tree):
        top = module.split(".")[0]
        if top == "transformers":
            found.append(f"{path.name}:{line} imports {module}: methods do not touch HF code")
        elif top == "sharp" and module not in ALLOWED_SHARP and not module.startswith(ALLOWED_PREFIXES):
            found.append(f"{path.name}:{line} imports {module}: outside the method API")
        elif module in ("sharp.methods.registry", "sharp.methods.settings"):
            found.append(f"{path.name}:{line} imports {module}: the registry/resolver is the harness's")
    for node in ast.walk(tree):
        own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES and not own:  # a method's own fields
            found.append(f"{path.name}:{node.lineno} uses .{node.attr}: {FORBIDDEN_ATTRIBUTES[node.attr]}")
    return found


def test_the_walk_finds_every_method_module():
    names = {p.name for p in method_module_paths()}
    assert {"fastv.py", "pdrop.py", "feather.py", "framefusion.py", "visionzip.py", "holitom.py", "sharpv.py",
            "sharp.py", "segm.py", "posc.py", "regd.py", "vanilla.py", "scorer.py"} <= names


@pytest.mark.parametrize("path", method_module_paths(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_method_module_uses_only_the_method_api(path):
    assert violations(path) == []


def test_the_walk_catches_each_kind_of_reach(tmp_path):
    """The checker itself can fail: a module that does each forbidden thing once."""
    bad = tmp_path / "bad_method.py"
    bad.write_text(
        "from sharp.engine.masks import SegmentRestriction\n"
        "import sharp.backbones.base\n"
        "from transformers import AutoModel\n"
        "def select(ctx):\n"
        "    a = ctx.seq.visual_index\n"
        "    b = ctx.backbone.layers[0].self_attn\n"
        "    return ctx._runner, ctx.sequence\n"
        "def install(self, ctx):\n    self.layers = ctx.num_layers\n")  # a method's own field: allowed
    found = violations(bad)
    for what in ("sharp.engine.masks", "sharp.backbones.base", "transformers", ".seq:", ".backbone:", ".layers:",
                 ".self_attn:", "._runner:", ".sequence:"):
        assert any(what in line for line in found), (what, found)
    good = tmp_path / "good_method.py"
    good.write_text("from sharp import PruningMethod, Selection, split_budget\n"
                    "def select(ctx):\n    return ctx.gather_visual(ctx.last_token_attention(layer=1))\n")
    assert violations(good) == []


if __name__ == "__main__":  # pragma: no cover - `python tests/test_method_api.py <file.py>` checks one file
    for p in sys.argv[1:]:
        print("\n".join(violations(Path(p))) or f"{p}: ok")
