"""Data parallel inside one cell: N processes share the requests, rank 0 writes the results.

lmms-eval shards the work itself: with ``RANK`` / ``WORLD_SIZE`` in the environment (set by
``accelerate launch``, ``torchrun`` or :func:`launch` below) its evaluator builds, on each rank, the
requests of the documents ``rank, rank + N, rank + 2N, ...`` of every task
(``lmms_eval.utils.create_iterator``), pads the ranks to the same count with requests marked
``metadata["__padding_only__"]`` (the wrappers answer those without running the model), and gathers
the per-sample logs and metrics on rank 0. The harness gathers its own per-request measurements the
same way (:func:`gather_rows`) and sorts them by (task, doc_id), so a cell's files do not depend on
the number of processes.

``python run.py num_processes=N`` (no launcher around it) starts N copies of itself with those
variables (:func:`launch`): rank 0 prints to the terminal, the other ranks to log files that are
removed when the cell succeeds. ``accelerate launch --num_processes N run.py ...`` works too.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sharp.harness.resources import HarnessError

PARENT_ENV = "SHARP_DP_PARENT"  # set by launch() for its children: the parent prints the report


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched in parallel)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world(env: Optional[dict] = None) -> World:
    """The rank, world size and local rank a launcher put in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``: torchrun / accelerate / :func:`launch`)."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", 0)))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise HarnessError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={env.get('RANK')!r} "
                           f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
    if size < 1 or not 0 <= rank < size:
        raise HarnessError(f"RANK={rank} WORLD_SIZE={size}: accepted values: 0 <= RANK < WORLD_SIZE")
    return World(rank, size, local)


def has_parent() -> bool:
    return os.environ.get(PARENT_ENV) == "1"


def shard(items: Sequence[Any], rank: int, size: int) -> list:
    """The items rank ``rank`` of ``size`` evaluates: ``items[rank::size]``, lmms-eval's document split
    (``create_iterator``: ``islice(raw_iterator, rank, limit, world_size)``)."""
    return list(itertools.islice(items, rank, None, size))


def request_key(row: dict) -> tuple:
    """Sort key of a per-request row: (task, doc_id); the order of a cell's requests.jsonl."""
    doc = row.get("doc_id")
    return (str(row.get("task")), doc if isinstance(doc, int) else -1, str(doc))


def sort_requests(rows: Sequence[dict]) -> list[dict]:
    return sorted(rows, key=request_key)


def merge_gathered(per_rank: Sequence[Sequence[dict]]) -> list[dict]:
    """Rows gathered from every rank -> one list in (task, doc_id) order, as a single process writes it."""
    return sort_requests([row for rows in per_rank for row in rows])


def init_group(cpu: bool) -> Any:
    """Initialise the process group (accelerate's shared state, which the wrappers' Accelerator reuses)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def barrier(w: World) -> None:
    if w.parallel:
        import torch.distributed as dist

        dist.barrier()


def gather_rows(rows: list, w: World) -> Optional[list]:
    """Every rank's ``rows`` concatenated on rank 0 (rank order); None on the other ranks."""
    if not w.parallel:
        return list(rows)
    import torch.distributed as dist

    out = [None] * w.size if w.main else None
    dist.gather_object(list(rows), out, dst=0)
    return [row for part in out for row in part] if w.main else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(rank: int, size: int, port: int, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{PARENT_ENV: "1"})
    return env


class ChildFailed(Exception):
    """A data-parallel child exited non-zero; ``code`` is its exit status (rank 0 printed its error)."""

    def __init__(self, code: int, message: Optional[str] = None):
        super().__init__(message or f"exit status {code}")
        self.code, self.message = code, message


def _last_error_line(path: Path) -> Optional[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error: ") or "Error" in line.split(":")[0]:
            return line.strip()
    return lines[-1].strip() if lines else None


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(args: Sequence[str], size: int, python: str = sys.executable) -> None:
    """Run ``python <args>`` as ``size`` data-parallel processes on this machine and wait for them.

    Rank 0 shares this terminal; rank k > 0 writes to ``<tmp>/rank<k>.log`` (kept and named in the
    error when a rank fails). When one process fails the others are stopped (they would wait for it
    in the next collective). Raises :class:`ChildFailed` with the exit status of the first failure."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="sharp-dp-"))
    procs, logs = [], []
    try:
        for rank in range(size):
            env = child_env(rank, size, port)
            if rank == 0:
                procs.append(subprocess.Popen([python, *args], env=env))
            else:
                fh = open(log_dir / f"rank{rank}.log", "w", encoding="utf-8")
                logs.append(fh)
                procs.append(subprocess.Popen([python, *args], env=env, stdout=fh, stderr=subprocess.STDOUT))
        failed: Optional[tuple[int, int]] = None
        while failed is None and any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0):
                    failed = (rank, code)
                    break
            time.sleep(0.2)
        if failed is None:
            failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode), None)
        if failed is not None:
            _stop(procs)
            rank, code = failed
            if rank == 0:
                raise ChildFailed(code)  # its error is on the terminal already
            line = _last_error_line(log_dir / f"rank{rank}.log")
            raise ChildFailed(code, f"process {rank} of {size} failed (exit status {code}): {line}; "
                                    f"its log: {log_dir / f'rank{rank}.log'}")
    except BaseException:
        _stop(procs)
        raise
    finally:
        for fh in logs:
            fh.close()
    for f in log_dir.iterdir():
        f.unlink()
    log_dir.rmdir()
