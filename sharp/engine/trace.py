"""What pruning did during the last prefill of a ``sharp.prune`` block."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch

from sharp.engine.attention import cuda_sync


@dataclass
class Trace:
    """Engine results of the last prefill, plus one namespace per method for its own results.

    kept: [stage][sample] -> 1-D LongTensor of ORIGINAL visual indices present after each applied
        stage (stages whose selection was ``Selection.unchanged()`` are not listed).
    stage_layers: [stage] -> the decoder layer of that applied stage; stage_owners: its method key.
    visual_tokens_per_layer: visual tokens each decoder layer processed in prefill (sample 0).
    visual_tokens_by_sample: [layer][sample] the same for every sample of the batch.
    stage_times: seconds per named step (engine: prefill, select, mask; methods add their own keys).
    clock: what every stage timer of the session reads (``time.perf_counter``; ``scripts/bench_prefill.py
        --clock cpu`` sets ``time.thread_time`` so that stage shares and prefill times are of one clock).
    decode_steps: [step] -> the decode-time visual-key selections of that decode step after the last
        prefill (methods with ``decode_stages``, DyCoke), each ``(layer, method key, kept)``: from
        ``layer`` on, the step's query saw the visual cache entries with ORIGINAL indices ``kept[b]``
        (None: the whole cache).
    methods: method key -> namespace of that method's results (``trace.method("sharp").segments``);
        the key is the method's name, ``name@i`` for the i-th of a repeated child.
    """

    kept: list[list[torch.Tensor]] = field(default_factory=list)
    stage_layers: list[int] = field(default_factory=list)
    stage_owners: list[str] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    visual_tokens_by_sample: list[list[int]] = field(default_factory=list)
    n_visual: int = 0
    stage_times: dict[str, float] = field(default_factory=dict)
    prefill_calls: int = 0
    methods: dict[str, SimpleNamespace] = field(default_factory=dict)
    decode_steps: list[list[tuple]] = field(default_factory=list)
    clock: Callable[[], float] = time.perf_counter

    def add_time(self, key: str, seconds: float) -> None:
        self.stage_times[key] = self.stage_times.get(key, 0.0) + seconds

    def now(self, device: Optional[torch.device] = None) -> float:
        """The stage clock, after waiting for ``device``'s queued GPU work (no wait on a CPU)."""
        if device is not None:
            cuda_sync(device)
        return self.clock()

    @contextmanager
    def timed(self, key: str, device: Optional[torch.device] = None) -> Iterator[None]:
        """Add the block's time on the stage clock to ``stage_times[key]``."""
        t0 = self.now(device)
        yield
        self.add_time(key, self.now(device) - t0)

    def method(self, key: str) -> SimpleNamespace:
        """The namespace of one method's results (key: its name, or ``name@i`` when repeated)."""
        if key not in self.methods:
            raise KeyError(f"no results of method {key!r} in this trace; methods: {', '.join(self.methods)}")
        return self.methods[key]

    def start_prefill(self, n_visual: int, method_keys: list[str]) -> None:
        self.kept, self.stage_layers, self.stage_owners = [], [], []
        self.visual_tokens_per_layer, self.visual_tokens_by_sample, self.stage_times = [], [], {}
        self.n_visual = n_visual
        self.prefill_calls += 1
        self.methods = {key: SimpleNamespace() for key in method_keys}
        self.decode_steps = []

    def record_stage(self, layer: int, key: str, kept: list[torch.Tensor]) -> None:
        """An applied stage: before ``layer``, method ``key`` left ``kept[b]`` (ORIGINAL indices)."""
        self.kept.append(kept)
        self.stage_layers.append(layer)
        self.stage_owners.append(key)

    def record_decode_selection(self, step: int, layer: int, key: str, kept: Optional[list[torch.Tensor]]) -> None:
        """Decode step ``step``: from ``layer`` on, method ``key`` let the query see the visual cache
        entries ``kept[b]`` (ORIGINAL indices; None = all)."""
        while len(self.decode_steps) <= step:
            self.decode_steps.append([])
        self.decode_steps[step].append((layer, key, kept))

    def record_layer_counts(self, counts: list[int]) -> None:
        """The visual tokens of each sample that the next decoder layer processes."""
        self.visual_tokens_per_layer.append(int(counts[0]))
        self.visual_tokens_by_sample.append([int(c) for c in counts])
