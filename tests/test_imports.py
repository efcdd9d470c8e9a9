"""The package's layering: the engine imports nothing from the methods, and every engine and methods
module imports on its own (no order-dependent import cycle)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sharp"


def modules_under(sub: str, top: Path = PACKAGE) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (top / sub).rglob("*.py"))


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


@pytest.mark.parametrize("path", sorted((PACKAGE / "backbones").glob("*.py")), ids=lambda p: p.name)
def test_backbones_import_no_engine_compat(path):
    """The backbones' transformers 4.57 / 5.x helpers are ``sharp.backbones.compat``; the engine's are its own."""
    assert "sharp.engine.compat" not in imported_modules(path), f"{path.name} imports sharp.engine.compat"


def test_every_engine_and_methods_module_imports_alone():
    """One interpreter (torch imported once); before each module every ``sharp`` module is forgotten, so
    the module is imported first, as a user's ``import baselines.fastv`` would."""
    modules = modules_under("engine") + modules_under("methods") + modules_under(".", ROOT / "baselines") + [
        "sharp.api", "sharp"]
    script = (
        "import importlib, sys, torch, transformers\n"
        f"failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('sharp', 'baselines')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "baselines.fastv" in modules and "sharp.engine.session" in modules  # the walk found them


def defines_a_method(module: str) -> bool:
    """Whether a module defines a PruningMethod subclass of its own (``baselines/density_peaks.py``, a
    shared step of two methods, defines none)."""
    import importlib
    import inspect

    from sharp import PruningMethod

    mod = importlib.import_module(module)
    return any(inspect.isclass(v) and issubclass(v, PruningMethod) and v.__module__ == module
               for v in vars(mod).values())


def test_methods_are_registered_only_through_entry_points():
    """The one list of methods is pyproject.toml's entry-point group ``sharp.methods`` (as an outside
    package's would be): every ``baselines`` module's method is there, ``sharp`` never imports
    ``baselines``, and no method registers itself by decorator."""
    import tomllib

    from sharp.methods.registry import ENTRY_POINT_GROUP, declared_compositions, entry_point_methods
    from sharp.methods import method_names

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    installed = entry_point_methods()
    assert {n: f"{c.__module__}:{c.__qualname__}" for n, c in installed.items() if n in listed} == listed
    assert sorted({*listed, *declared_compositions()}) == [n for n in method_names() if not n.startswith("_")]
    assert {v.split(":")[0] for v in listed.values() if v.startswith("baselines.")} == {
        m for m in modules_under(".", ROOT / "baselines") if m != "baselines" and defines_a_method(m)}
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "baselines").glob("*.py")]:
        assert "@register_method" not in path.read_text(), f"{path.name}: methods register through entry points"
        assert not any(m == "baselines" or m.startswith("baselines.") for m in imported_modules(path)) \
            or path.parent.name == "baselines", f"{path} imports baselines: sharp must not depend on it"
