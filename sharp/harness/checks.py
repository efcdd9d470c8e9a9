"""Checks made when a cell is composed, before anything is loaded or written.

Every bad value gives one :class:`HarnessError` line naming the value and the accepted ones
(``run.py`` prints it and exits with status 2):

- run options of ``configs/config.yaml``: ``limit``, ``batch_size``, ``num_processes``, ``strict``,
  ``overwrite``, ``log_samples``, ``seed``, ``bootstrap_iters``, ``device`` (:func:`run_options`);
- the method: resolved for the backbone from its config file, without loading weights
  (:func:`sharp.methods.settings.resolve_method`: names, types and values of its kwargs, compact
  positions on M-RoPE, layers outside the model), in ``sharp.harness.runner.validate_method``;
- Hydra's own composition errors (unknown key, unknown config-group option, override syntax), turned
  into one line by :func:`hydra_error_line`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from sharp.harness.resources import HarnessError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a cell runs (not part of its identity: results do not depend on them, see results/README.md)."""

    batch_size: int = 1
    num_processes: int = 1
    strict: bool = False
    device: Optional[str] = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_limit(value: Any) -> Optional[float]:
    """``null`` (whole benchmark), an integer >= 1 (documents per task) or a fraction in (0, 1) (lmms-eval's
    ``--limit``); an integral float becomes an int."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if (_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
        return value
    raise HarnessError(f"limit={value!r}: accepted values: null (the whole benchmark), an integer >= 1 "
                       "(documents per task) or a fraction in (0, 1)")


def check_retention(value: Any, method: str) -> float:
    """The engine's retention rule (:func:`sharp.engine.method.check_retention`) as a harness error."""
    from sharp.engine.method import check_retention as engine_check

    try:
        return engine_check(value)
    except ValueError:
        raise HarnessError(f"retention={value!r} (method {method}): accepted values: a number in (0, 1] "
                           "(the kept share of the visual tokens)") from None


def _positive_int(cfg, key: str, what: str) -> int:
    value = cfg.get(key, 1)
    if value is None:
        return 1
    if not _is_int(value) or value < 1:
        raise HarnessError(f"{key}={value!r}: accepted values: an integer >= 1 ({what})")
    return int(value)


def _bool(cfg, key: str) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HarnessError(f"{key}={value!r}: accepted values: true, false")
    return value


def check_device(value: Any, num_processes: int) -> Optional[str]:
    if value in (None, "", "auto"):
        return None
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise HarnessError(f"device={value!r}: accepted values: null (cuda when available), cpu, cuda, cuda:<index>")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise HarnessError(f"device={value!r}: no CUDA device is visible here; accepted values: null, cpu")
        if ":" in value and num_processes > 1:
            raise HarnessError(f"device={value!r} with num_processes={num_processes}: accepted values: cuda or null "
                               "(process k uses cuda:k)")
    return value


def check_processes(num_processes: int, device: Optional[str]) -> None:
    """N processes need N CUDA devices unless they run on the CPU."""
    if num_processes == 1 or device == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if num_processes > n:
            raise HarnessError(f"num_processes={num_processes}: {n} CUDA device(s) visible; accepted values: "
                               f"1..{n} (or device=cpu)")


def run_options(cfg) -> RunOptions:
    """Check the top-level run values of ``cfg`` (one HarnessError line each); return the options."""
    batch_size = _positive_int(cfg, "batch_size", "requests per forward pass, grouped by video layout; "
                               "the paper's numbers are batch 1")
    num_processes = _positive_int(cfg, "num_processes", "data-parallel processes, one GPU each")
    strict = _bool(cfg, "strict")
    for key in ("overwrite", "log_samples"):
        _bool(cfg, key)
    seed = cfg.get("seed", 0)
    if not _is_int(seed):
        raise HarnessError(f"seed={seed!r}: accepted values: an integer")
    iters = cfg.get("bootstrap_iters", 1000)
    if not _is_int(iters) or iters < 0:
        raise HarnessError(f"bootstrap_iters={iters!r}: accepted values: an integer >= 0")
    gen = cfg.get("gen_kwargs")
    if gen is not None and not isinstance(gen, str):
        raise HarnessError(f"gen_kwargs={gen!r}: accepted values: null or a string like \"max_new_tokens=8\"")
    device = check_device(cfg.get("device"), num_processes)
    check_processes(num_processes, device)
    return RunOptions(batch_size=batch_size, num_processes=num_processes, strict=strict, device=device)


# ----------------------------------------------------------------------------- Hydra
def hydra_error_line(err: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra composition error: what was given and what is accepted."""
    from hydra.errors import MissingConfigException

    text = str(err).strip()
    if isinstance(err, MissingConfigException) and getattr(err, "options", None):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        if m:
            group, name = m.groups()
            options = [o for o in err.options if not o.startswith("_")]  # "_name": test-only methods
            return f"{group}={name}: no configs/{group}/{name}.yaml; accepted values: {', '.join(options)}"
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        given = next((o for o in overrides if o.split("=", 1)[0].lstrip("~+") == key), key)
        top = key.split(".")[0]
        return (f"{given}: '{key}' is not a key of the config (configs/config.yaml and its groups); "
                f"accepted: an existing key (python run.py --cfg job lists them), or +{given.lstrip('+')} to add "
                f"one{' (method kwargs: +method_kwargs.<name>=<value>)' if top != 'method_kwargs' else ''}")
    first = " ".join(line.strip() for line in text.splitlines()[:2] if line.strip() and "hydra.cc" not in line)
    if type(err).__name__ == "OverrideParseException":
        bad = _unparsable(overrides)
        return (f"{bad or 'override'}: cannot parse this override ({first}); accepted form: key=value "
                "(see https://hydra.cc/docs/advanced/override_grammar/basic/)")
    return first or type(err).__name__


def _unparsable(overrides: list[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except Exception:  # noqa: BLE001 - the first override Hydra cannot read
            return o
    return None
