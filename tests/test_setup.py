"""scripts/setup.sh's torch lines and the constraints files (offline: nothing is installed).

* each TORCH line's torch is inside pyproject's declared range, 2.15.0 is the default, a wrong value
  stops before pip runs;
* the constraints files pin every declared dependency (qwen-vl-utils included) but never torch,
  torchvision or torch's CUDA wheels, which setup.sh installs per TORCH line (a torch pin there would
  make pip replace the line's torch with it);
* ``scripts/pin_constraints.py`` walks through torch's requirements without pinning torch's own stack.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tomllib

from packaging.requirements import Requirement

from sharp.harness.config import REPO_ROOT

SETUP = REPO_ROOT / "scripts" / "setup.sh"
CONSTRAINTS = [REPO_ROOT / "constraints.txt", REPO_ROOT / "constraints-4.57.txt"]


def _project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _declared(name: str) -> Requirement:
    return next(r for r in map(Requirement, _project()["dependencies"]) if r.name == name)


def _torch_lines() -> dict[str, tuple[str, str]]:
    """TORCH value -> (torch version, torchvision version), read off setup.sh's case arms."""
    arms = re.findall(r"^\s*([\w.|]+)\) TORCH_PIN=torch==([\d.]+); TORCHVISION_PIN=torchvision==([\d.]+) ;;",
                      SETUP.read_text(), re.M)
    return {value: (torch, vision) for values, torch, vision in arms for value in values.split("|")}


def _pins(path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def test_torch_lines_are_inside_the_declared_range_and_2_15_is_the_default():
    lines = _torch_lines()
    assert lines["2.15"] == lines["current"] == ("2.15.0", "0.29.2")
    assert lines["2.13"] == ("2.13.0", "0.28.0")
    assert 'case "${TORCH:-2.15}" in' in SETUP.read_text()
    declared = _declared("torch").specifier
    assert all(declared.contains(torch) for torch, _ in lines.values()), declared


def test_unknown_line_stops_before_pip():
    for var, value in (("TORCH", "2.99"), ("TRANSFORMERS", "3")):
        env = {**os.environ, var: value, "PYTHON": "/nonexistent/python"}  # pip would fail differently
        proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {var}={value}: expected ")


def _ci_lines() -> dict[str, str]:
    """constraints file -> the TORCH value CI installs it with (``setup_line <venv> TORCH TRANSFORMERS``)."""
    files = {"5": "constraints.txt", "4.57": "constraints-4.57.txt"}
    calls = re.findall(r"^setup_line \S+ (\S+) (\S+)$", (REPO_ROOT / ".ci" / "run").read_text(), re.M)
    return {files[transformers]: torch for torch, transformers in calls}


def test_constraints_pin_the_dependencies_but_not_the_torch_stack():
    ci = _ci_lines()
    assert ci == {"constraints.txt": "2.15", "constraints-4.57.txt": "2.13"}  # default lines; older lines
    for path in CONSTRAINTS:
        pins = _pins(path)
        header = path.read_text().splitlines()[0]
        torch, vision = _torch_lines()[ci[path.name]]  # pinned in the environment CI tests the file in
        assert re.search(rf"torch {re.escape(torch)}(\+cpu)?, torchvision ({re.escape(vision)}|absent)\)", header), header
        assert "qwen-vl-utils" in pins and Requirement(
            str(_declared("qwen-vl-utils"))).specifier.contains(pins["qwen-vl-utils"])
        stack = [n for n in pins if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-"))]
        assert stack == [], (path.name, stack)
        for req in map(Requirement, _project()["dependencies"]):  # each declared dependency, at an accepted version
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            if name != "torch":
                assert req.specifier.contains(pins[name]), (path.name, name, pins[name])


def test_pin_constraints_walks_torch_without_pinning_its_stack():
    spec = importlib.util.spec_from_file_location("pin_constraints", REPO_ROOT / "scripts" / "pin_constraints.py")
    pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin)
    pins = pin.closure(["torch"])
    assert "torch" not in pins and not any(pin._torch_cuda_wheel(n) for n in pins)
    assert {"sympy", "networkx", "jinja2", "filelock"} <= set(pins)  # torch's own requirements are pinned
    assert pin._torch_cuda_wheel("nvidia-cudnn-cu13") and pin._torch_cuda_wheel("cuda-toolkit")
    assert pin._torch_cuda_wheel("triton") and not pin._torch_cuda_wheel("tokenizers")
