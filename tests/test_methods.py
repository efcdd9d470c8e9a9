"""Invariants every registered method (and the listed compositions) must keep, on both tiny backbones.

kvpress-style: tests/default_methods.py lists the cases; a newly registered method is picked up.
- the trace's visual_tokens_per_layer equals the method's token schedule;
- at retention 1.0 a method whose R = 1 is the identity is bit-identical to vanilla;
- every decode step equals a no-cache forward of the unpruned model that replays what the engine
  applied (kept keys per layer, merged rows, custom masks; tests/engine_reference.py);
- bad kwargs fail when the method is made, before any forward.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

import sharp
from sharp.engine import ComposedMethod

from default_methods import method_cases, resolved
from engine_reference import Recorder, generate_with_logits, replay_reference_logits
from conftest import shared_backbone

BACKBONES = ["tiny_llava_onevision", "tiny_qwen2_vl"]
CASES = [(name, kwargs) for _, name, kwargs in method_cases()]
IDS = [case_id for case_id, _, _ in method_cases()]


def backbone(name, impl="eager"):
    return shared_backbone(name, impl)


def make(name, kwargs, retention, backbone):
    return resolved(name, kwargs, retention, backbone)


def compact_layers(method, trace, num_layers):
    """{layer: the layer of the last compacting stage at or before it}: the kept set that numbers
    that layer's positions (later non-compacting stages keep those numbers)."""
    leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
    by_key = dict(zip(_keys(leaves), leaves))
    stages = [layer for layer, owner in zip(trace.stage_layers, trace.stage_owners) if by_key[owner].compacts_at(layer)]
    return {layer: max(k for k in stages if k <= layer) for layer in range(num_layers)
            if any(k <= layer for k in stages)}


def _keys(leaves):
    from sharp.engine.compose import child_keys

    return child_keys([m.name for m in leaves])


@pytest.mark.parametrize("bb_name", BACKBONES)
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_trace_follows_token_schedule(bb_name, name, kwargs):
    bb = backbone(bb_name)
    inputs = bb.synthetic_inputs(frames=8, seed=11)
    method = make(name, kwargs, 0.25, bb_name)
    with sharp.prune(bb, method) as trace, torch.no_grad():
        bb.model(**inputs)
    n_vis = bb.layout(inputs).n_visual
    leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
    if any(m.input_dependent_schedule for m in leaves):  # a class attribute or a property
        # kept counts depend on the input: the measured schedule never increases and ends pruned
        per_layer = trace.visual_tokens_per_layer
        assert len(per_layer) == bb.num_layers and all(b <= a for a, b in zip(per_layer, per_layer[1:]))
    else:
        assert trace.visual_tokens_per_layer == method.token_schedule(n_vis, bb.num_layers, backbone=bb)
    assert trace.visual_tokens_per_layer[-1] < n_vis or name == "vanilla"


@pytest.mark.parametrize("bb_name", BACKBONES)
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_full_retention_is_identity(bb_name, name, kwargs):
    method = make(name, kwargs, 1.0, bb_name)
    leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
    if not all(type(m).identity_at_full_retention for m in leaves):
        pytest.skip(f"{name}: R = 1 is not the identity (e.g. SegM masks layer 0)")
    if any(getattr(m, "retention", 1.0) != 1.0 for m in leaves):
        pytest.skip(f"{name}: a child has its own retention below 1")
    bb = backbone(bb_name, "sdpa")
    inputs = bb.synthetic_inputs(frames=8, seed=12, batch_size=2)
    ref_seq, ref_logits = generate_with_logits(bb, inputs)
    with sharp.prune(bb, method):
        seq, logits = generate_with_logits(bb, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("bb_name", BACKBONES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_decode_equals_masked_no_cache_reference(bb_name, batch, name, kwargs):
    bb = backbone(bb_name)
    inputs = bb.synthetic_inputs(frames=8, seed=13, batch_size=batch)
    method = make(name, kwargs, 0.25, bb_name)
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace:
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=4)
    ref = replay_reference_logits(bb, inputs, seq, trace, recorder,
                                  compact_layers=compact_layers(method, trace, bb.num_layers))
    p = inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref[:, p - 1: seq.shape[1] - 1], atol=2e-4, rtol=1e-4)


def _bad_values(cls):
    """(field, bad value) pairs: a string for every numeric field, a number for every str field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in hints:
            continue
        hint = hints[f.name]
        if hint in (int, float, bool):
            yield f.name, "not-a-number"
        elif hint is str:
            yield f.name, 3


@pytest.mark.parametrize("name", [n for n in sharp.method_names() if not n.startswith("_")])
def test_bad_kwargs_fail_when_made(name):
    cls = sharp.get_method_class(name)
    with pytest.raises(TypeError, match="unknown argument|per-child"):
        sharp.make_method(name, 0.5, no_such_kwarg=1)
    if issubclass(cls, ComposedMethod):
        return
    for field, value in _bad_values(cls):
        with pytest.raises((TypeError, ValueError), match=field):
            sharp.make_method(name, 0.5, **{field: value})


@pytest.mark.parametrize("name", [n for n in sharp.method_names() if not n.startswith("_")])
def test_layer_outside_the_model_fails_before_any_forward(name):
    cls = sharp.get_method_class(name)
    layer_fields = [f.name for f in dataclasses.fields(cls) if f.init and "layer" in f.name
                    and typing.get_type_hints(cls).get(f.name) is int]
    if not layer_fields:
        pytest.skip(f"{name} has no layer kwarg")
    bb = backbone("tiny_llava_onevision", "sdpa")
    calls = []
    h = bb.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for field in layer_fields:
            with pytest.raises(ValueError, match="layer"):
                with sharp.prune(bb, name, 0.5, **{field: bb.num_layers + 5}):
                    pass
    finally:
        h.remove()
    assert not calls
