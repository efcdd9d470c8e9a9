"""The package's layering: the engine imports nothing from the methods, and every engine and methods
module imports on its own (no order-dependent import cycle)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharp"


def modules_under(sub: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (PACKAGE / sub).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in the file names (function-level ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_imports_no_method_or_harness_module(path):
    above = sorted(m for m in imported_modules(path)
                   if m == "sharp" or m.startswith(("sharp.methods", "sharp.api", "sharp.harness", "sharp.lmms",
                                                    "sharp.toy", "sharp.flops", "baselines")))
    assert above == [], f"{path.name} imports {above}: the engine must not depend on what is built on it"


def test_every_engine_and_methods_module_imports_alone():
    """One interpreter (torch imported once); before each module every ``sharp`` module is forgotten, so
    the module is imported first, as a user's ``import sharp.methods.fastv`` would."""
    modules = modules_under("engine") + modules_under("methods") + ["sharp.api", "sharp"]
    script = (
        "import importlib, sys, torch, transformers\n"
        f"failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sharp' or m.startswith('sharp.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sharp.methods.fastv" in modules and "sharp.engine.session" in modules  # the walk found them


def test_builtin_methods_are_one_explicit_list():
    from sharp.methods import BUILTIN_METHODS, method_names

    builtin = sorted(cls.name for cls in BUILTIN_METHODS)
    assert len(builtin) == len(set(builtin))
    assert builtin == [n for n in method_names() if not n.startswith("_")]
    for path in (PACKAGE / "methods").glob("*.py"):
        assert "@register_method" not in path.read_text(), f"{path.name}: built-ins are listed in registry.py"
    assert not (ROOT / "baselines").exists()
