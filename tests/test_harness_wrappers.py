"""lmms-eval wrappers: registration, request order, generation kwargs, model_args errors, one real run."""
import contextlib
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

import sharp
from lmms_eval.api.instance import GenerationResult, Instance

from sharp.harness import catalog
from sharp.lmms import models as W
from sharp.lmms.manifest import model_ids


class _Tok:
    eos_token_id = 0
    pad_token_id = 0

    def __init__(self):
        self.vocab = {}

    def encode_text(self, text):
        ids = []
        for ch in text:
            ids.append(self.vocab.setdefault(ch, len(self.vocab) + 1))
        return ids

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv.get(int(i), "") for i in ids if int(i) != 0)


class _Model(torch.nn.Module):
    """generate() answers '<answer of the prompt>\\n\\ntrailing' and records its kwargs."""

    def __init__(self, tok):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        self.tok, self.calls = tok, []

    def forward(self, input_ids=None, **kw):
        return input_ids

    def generate(self, input_ids=None, attention_mask=None, answer=None, **kw):
        self.calls.append(kw)
        self(input_ids=input_ids)  # the prefill the wrapper times
        new = torch.tensor([self.tok.encode_text(answer + "\n\ntrailing")])[:, : kw["max_new_tokens"]]
        return torch.cat([input_ids, new], dim=1)


class _Backbone:
    def __init__(self, name):
        self.name, self.kind = name, "llava_onevision"
        self.tokenizer = _Tok()
        self.model = _Model(self.tokenizer)
        self.prepared = []

    def prepare(self, video, question):
        self.prepared.append((video, question))
        return {"input_ids": torch.ones(1, 10, dtype=torch.long), "attention_mask": torch.ones(1, 10),
                "answer": f"ans:{question}"}

    def layout(self, inputs):
        return SimpleNamespace(n_visual=64)


@pytest.fixture
def stub(monkeypatch, tmp_path):
    made = {}

    def load_backbone(name, **kw):
        made["bb"] = _Backbone(name)
        made["kwargs"] = kw
        return made["bb"]

    @contextlib.contextmanager
    def prune(bb, method, retention, **kw):
        made.setdefault("prune", []).append((method, retention, kw))
        yield SimpleNamespace(visual_tokens_per_layer=[64, 64] + [max(1, round(64 * retention))] * 2,
                              stage_times={"select": 0.001})

    monkeypatch.setattr(sharp, "load_backbone", load_backbone)
    monkeypatch.setattr(sharp, "prune", prune)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    made["video"] = str(video)
    return made


def _requests(video, gen_kwargs, n=3, task="t"):
    docs = [{"q": f"question {i}", "video": video} for i in range(n)]
    reqs = [Instance("generate_until", (f"question {i}", dict(gen_kwargs), lambda d: [d["video"]], i, task, "test"),
                     idx=0, metadata={"task": task, "doc_id": i, "repeats": 1}) for i in range(n)]
    return {task: {"test": docs}}, reqs


def test_entry_point_resolves_our_classes():
    eps = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.value.startswith("sharp.")]
    if not eps:
        pytest.skip("the project is not installed (`pip install -e .` registers the lmms_eval.models entry point)")
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    assert get_model("llava_onevision_fastv") is W.SharpLlavaOneVision__fastv
    assert get_model("sharp_qwen2_vl") is W.SharpQwen2VL
    assert get_model("sharp_llava_onevision") is W.SharpLlavaOneVision
    assert get_model("qwen2_vl_sharp").fixed_method == "sharp"
    assert {"sharp_llava_onevision", "sharp_qwen2_vl", "llava_onevision_vanilla", "qwen2_vl_fastv"} <= set(
        MODEL_REGISTRY_V2.list_model_names())
    assert get_model("llava_onevision").__module__.startswith("lmms_eval")  # built-ins untouched


def test_model_ids_come_from_the_method_registry():
    ids = model_ids()
    registered = catalog.registered_methods()
    assert ids == ["sharp_llava_onevision", "sharp_qwen2_vl"] + [
        f"{family}_{m}" for family in ("llava_onevision", "qwen2_vl") for m in registered if m.isidentifier()]
    assert {"llava_onevision_vanilla", "qwen2_vl_fastv", "llava_onevision_sharp"} <= set(ids)
    for m in catalog.planned_methods():  # planned methods get an id when they are registered
        assert (f"llava_onevision_{m}" in ids) == (m in registered)


def test_known_backbones_come_from_the_backbone_registry():
    for family in ("llava_onevision", "qwen2_vl"):
        names = W.known_backbones(family)
        assert names[0] == catalog.DEFAULT_BACKBONES[family]
        assert sorted(names) == sorted(n for n in sharp.backbone_names() if catalog.backbone_family(n) == family)
    assert {"tiny_qwen2_vl", "toy_qwen2_vl", "qwen2_vl_7b"} <= set(W.known_backbones("qwen2_vl"))


def test_requests_keep_order_and_gen_kwargs_apply(stub):
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision", method="fastv", retention=0.25, layer=2)
    lm.task_dict, reqs = _requests(stub["video"], {"until": ["\n\n"], "max_new_tokens": 64, "temperature": 0,
                                                   "do_sample": False, "top_p": 1.0, "num_beams": 1}, n=4)
    out = lm.generate_until(reqs)
    assert all(isinstance(o, GenerationResult) for o in out)
    assert [o.text for o in out] == [f"ans:question {i}" for i in range(4)]  # request order, cut at until
    calls = stub["bb"].model.calls[1:]  # [0] is the untimed warm-up
    assert len(calls) == 4
    assert all(c["max_new_tokens"] == 64 and c["do_sample"] is False and c.get("num_beams") == 1 for c in calls)
    assert all(c.get("temperature") is None and c.get("top_p") is None for c in calls)  # greedy
    assert [q for _, q in stub["bb"].prepared[1:]] == [f"question {i}" for i in range(4)]
    assert stub["prune"][-1] == ("fastv", 0.25, {"layer": 2})
    stats = lm.request_stats
    assert [s["doc_id"] for s in stats] == [0, 1, 2, 3]
    assert stats[0]["visual_tokens_before"] == 64 and stats[0]["visual_tokens_after"] == 16
    assert stats[0]["prefill_ms"] is not None and stats[0]["stage_ms"] == {"select": 1.0}
    assert out[0].token_counts.input_tokens == 10


def test_max_new_tokens_default_and_sampling(stub):
    lm = W.SharpQwen2VL(backbone="tiny_qwen2_vl", warmup=0)
    lm.task_dict, reqs = _requests(stub["video"], {"temperature": 0.7, "top_p": 0.9, "until": "ans"}, n=1)
    out = lm.generate_until(reqs)
    call = stub["bb"].model.calls[0]
    assert call["max_new_tokens"] == 128  # qwen2_vl built-in default when the task sets none
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert out[0].text == ""  # cut at the until string "ans"
    assert W.SharpLlavaOneVision.default_max_new_tokens == 1024  # llava_onevision built-in default


@pytest.mark.parametrize("cls,args,needle", [
    (W.SharpLlavaOneVision, {"backbone": "qwen2_vl_7b"}, "backbone='qwen2_vl_7b' is not a llava_onevision backbone; accepted values: llava_onevision_7b"),
    (W.SharpLlavaOneVision, {"method": "nosuch"}, "unknown pruning method 'nosuch'; valid methods:"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 1.5}, "retention must be in (0, 1]"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 0.25, "lyer": 2}, "unknown argument(s) lyer; valid arguments:"),
    (W.SharpLlavaOneVision, {"method": "vanilla", "retention": 0.5}, "accepted values: 1"),
    (W.SharpQwen2VL, {"batch_size": 4}, "batch_size=4 is not supported; accepted values: 1"),
    (W.SharpQwen2VL, {"batch_size": "auto"}, "batch_size='auto'"),
    (W.method_class(W.SharpQwen2VL, "fastv"), {"method": "vanilla"}, "method='vanilla' conflicts with the model id"),
    (W.SharpLlavaOneVision, {"method": "fastv+sharp", "retention": 0.25, "visionzip.layer": 2},
     "visionzip.layer: 'visionzip' is not a child of method 'fastv+sharp'; its children: fastv, sharp"),
    (W.SharpLlavaOneVision, {"method": "fastv", "retention": 0.25, "sharp.layer": 2},
     "sharp.layer: dotted keys set a child's kwarg of a composed method"),
    (W.SharpLlavaOneVision, {"method": "fastv+sharp", "retention": 0.25, "layer": 2}, "fastv, sharp"),
    (W.SharpLlavaOneVision, {"method": "fastv+nosuch", "retention": 0.25}, "unknown pruning method 'nosuch'"),
])
def test_bad_model_args_name_the_argument_and_accepted_values(stub, cls, args, needle):
    with pytest.raises(W.ModelArgsError) as err:
        cls(**args)
    assert needle in str(err.value)
    assert "bb" not in stub  # rejected before loading anything


def test_planned_method_fails_naming_the_implemented_ones(stub):
    missing = [m for m in catalog.planned_methods() if m not in catalog.registered_methods()]
    if not missing:
        pytest.skip("every planned method is registered")
    for cls, args in ((W.method_class(W.SharpLlavaOneVision, missing[0]), {}),
                      (W.SharpQwen2VL, {"method": missing[0]})):
        with pytest.raises(W.ModelArgsError) as err:
            cls(retention=0.25, **args)
        msg = str(err.value)
        assert f"method {missing[0]!r} is not implemented yet [planned: " in msg and "\n" not in msg
        assert "implemented methods: " + ", ".join(catalog.registered_methods()) in msg
    assert "bb" not in stub


def test_model_args_string_parsing(stub):
    lm = W.SharpLlavaOneVision.create_from_arg_string(
        "backbone=tiny_llava_onevision,method=fastv,retention=0.25,layer=3,attn_implementation=eager,num_frames=8",
        {"batch_size": "1", "device": None})
    assert (lm.method, lm.retention, lm.method_kwargs) == ("fastv", 0.25, {"layer": 3})
    assert stub["kwargs"] == {"attn_implementation": "eager", "num_frames": 8}


def test_model_args_dotted_keys_become_per_child_dicts(stub):
    lm = W.SharpLlavaOneVision.create_from_arg_string(
        "backbone=tiny_llava_onevision,method=fastv+sharp,retention=0.25,sharp.layer=2,fastv.retention=0.5,"
        "sharp.lam=0.5", {"batch_size": "1", "device": None})
    assert lm.method == "fastv+sharp" and lm.retention == 0.25
    assert lm.method_kwargs == {"sharp": {"layer": 2, "lam": 0.5}, "fastv": {"retention": 0.5}}
    lm.task_dict, reqs = _requests(stub["video"], {"max_new_tokens": 4}, n=1)
    lm.generate_until(reqs)
    assert stub["prune"][-1] == ("fastv+sharp", 0.25, {"sharp": {"layer": 2, "lam": 0.5}, "fastv": {"retention": 0.5}})
    # what the harness records is the same string back
    from lmms_eval.utils import simple_parse_args_string

    from sharp.lmms.args import format_model_args, nest_child_kwargs

    kwargs = {"backbone": "tiny_llava_onevision", "method": "fastv+sharp", "retention": 0.25, **lm.method_kwargs}
    text = format_model_args(kwargs)
    assert text == ("backbone=tiny_llava_onevision,method=fastv+sharp,retention=0.25,sharp.layer=2,sharp.lam=0.5,"
                    "fastv.retention=0.5")
    assert nest_child_kwargs("fastv+sharp", simple_parse_args_string(text)) == kwargs
    # repeated children are keyed name@i
    assert nest_child_kwargs("fastv+fastv", {"fastv@2.layer": 3}) == {"fastv@2": {"layer": 3}}
    with pytest.raises(W.ModelArgsError, match="its children: fastv@1, fastv@2"):
        nest_child_kwargs("fastv+fastv", {"fastv.layer": 3})


def test_missing_video_is_a_clear_error(stub, tmp_path):
    lm = W.SharpLlavaOneVision(backbone="tiny_llava_onevision")
    lm.task_dict, reqs = _requests(str(tmp_path / "nope.mp4"), {}, n=1)
    with pytest.raises(W.MissingResourceError, match="nope.mp4"):
        lm.generate_until(reqs)


def test_real_tiny_backbone_through_the_wrapper():
    from sharp.synthetic import ensure_split

    docs = ensure_split("test", n=2)
    lm = W.method_class(W.SharpQwen2VL, "fastv")(backbone="tiny_qwen2_vl", retention=0.25, num_frames=8)
    task_docs = [{"video": d["video"], "prompt": d["prompt"]} for d in docs]
    lm.task_dict = {"t": {"test": task_docs}}
    reqs = [Instance("generate_until", (d["prompt"], {"max_new_tokens": 3, "until": ["\n\n"]},
                                        lambda doc: [doc["video"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(task_docs)]
    out = lm.generate_until(reqs)
    assert len(out) == 2
    for s in lm.request_stats:
        assert s["visual_tokens_after"] == sharp.methods.budget(s["visual_tokens_before"], 0.25)
        assert 0 < s["output_tokens"] <= 3 and s["prefill_ms"] > 0 and s["prefill_tflops"] > 0
        assert s["peak_memory_mb"] > 0
        assert s["prefill_tflops_measured"] == pytest.approx(s["prefill_tflops"], rel=1e-6)
