"""Write the tested set of one transformers line: what the project and lmms-eval's real imports pull.

Walks the declared requirements (pyproject's dependencies and ``test`` extra, requirements-lmms.txt,
lmms-eval itself without its declared dependencies) through the installed packages' metadata and
pins each reached distribution at its installed version, so the file holds only what ``setup.sh``
installs, nothing else the machine happens to have. torch, torchvision and torch's CUDA wheels
(``nvidia-*``, ``cuda-*``, ``triton``) are not pinned: setup.sh installs them per TORCH line (2.15.0 or
2.13.0, CPU or CUDA build), and one constraints file serves both lines; the header names the torch
the set was tested with. torch's other requirements (sympy, networkx, ...) are pinned.

    python scripts/pin_constraints.py > constraints.txt            # in the 5.x environment
    python scripts/pin_constraints.py > constraints-4.57.txt       # in the 4.57 environment
"""
from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SKIP = {"sharp-prune", "lmms-eval", "pip", "setuptools", "wheel"}  # installed by setup.sh itself
TORCH_LINE = {"torch", "torchvision"}  # setup.sh's per TORCH line: not pinned, their requirements are
TORCH_CUDA_PREFIXES = ("nvidia-", "cuda-")  # torch's CUDA wheels (with triton): exact pins of torch's own


def _torch_cuda_wheel(name: str) -> bool:
    return name.startswith(TORCH_CUDA_PREFIXES) or name == "triton"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    for line in (REPO / "requirements-lmms.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            reqs.append(line)
    return reqs


def closure(reqs: list[str]) -> dict[str, str]:
    env = default_environment()
    pinned: dict[str, str] = {}
    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = _norm(req.name)
        if name in pinned or name in seen or name in SKIP or _torch_cuda_wheel(name):
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            print(f"error: {req.name} is required but not installed; run scripts/setup.sh first", file=sys.stderr)
            sys.exit(2)
        if name not in TORCH_LINE:
            pinned[name] = dist.version.split("+")[0]
        todo.extend(dist.requires or [])
    return pinned


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    import transformers

    pins = closure(roots())
    torchvision = installed_version("torchvision")
    print(f"# Tested set for transformers {transformers.__version__} (python {sys.version.split()[0]}, torch "
          f"{installed_version('torch')}, torchvision {torchvision or 'absent'}): written by "
          "scripts/pin_constraints.py;")
    print("# only what the project and lmms-eval's real imports pull. lmms-eval==0.7.3 is installed with "
          "--no-deps;")
    print("# torch, torchvision and torch's CUDA wheels are installed by scripts/setup.sh per TORCH line "
          "(not pinned here).")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
