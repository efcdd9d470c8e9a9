"""One prepared GPU check (run through ``scripts/gpu_check.sh``): prefill table, decode = reference, peak memory.

    bash scripts/gpu_check.sh                       # CUDA machine, nothing downloaded: 7B LLaVA-OV + Qwen2-VL
    bash scripts/gpu_check.sh --dry-run             # CPU, tiny backbones, seconds (CI: tests/test_gpu_check.py)

For each backbone (7B LLaVA-OneVision and Qwen2-VL built from their configs with random weights,
bf16, directly on the GPU; ``--dry-run``: the tiny ones, float32 on CPU) and each attention
implementation (sdpa, and flash_attention_2 when ``flash_attn`` imports on a GPU):

1. the prefill table of every registered method at ``--retention`` (``scripts/bench_prefill.py``: speedup,
   FLOPs ratios, speed/FLOPs, selection share, peak memory from ``torch.cuda.max_memory_allocated``);
2. decode = reference: for every method, greedy ``generate`` of ``--new-tokens`` tokens with pruning,
   then a no-cache forward of the unpruned model over prompt + generated tokens that replays what the
   engine applied (``tests/engine_reference.py``, eager attention), logits compared with a tolerance
   (bf16: ``--atol``, default 0.15 on logits; float32: 2e-4) and the greedy tokens equal where the
   reference's top-2 margin exceeds the tolerance;
3. one JSON (``--out``/gpu_check.json) and one Markdown file (``--out``/gpu_check.md) with every table.

A time guard (``--budget-s``, default 450) skips what would start after the budget and says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import sharp  # noqa: E402

FULL = {"backbones": ["llava_onevision_7b", "qwen2_vl_7b"], "frames": 32, "decode_frames": 8, "dtype": "bfloat16",
        "repeats": 3, "warmup": 1}
DRY = {"backbones": ["tiny_llava_onevision", "tiny_qwen2_vl"], "frames": 4, "decode_frames": 4, "dtype": "float32",
       "repeats": 1, "warmup": 0}


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def build(name: str, attn: str, dtype: torch.dtype, device: str):
    """A backbone with seeded random weights built directly on ``device`` in ``dtype`` (a 7B model in
    seconds on a GPU; ``sharp.load_backbone`` initialises in float32 on the CPU first)."""
    from sharp.backbones.base import _config_path, _resolve_spec, family_class

    if device == "cpu":
        return sharp.load_backbone(name, attn_implementation=attn, dtype=dtype, device=device, random_weights=True)
    spec = _resolve_spec(name, None)
    cls = family_class(spec["family"])
    config = cls.build_config(_config_path(spec), attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls.model_class()(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    return cls(name=name, model=model, tokenizer=cls.make_tokenizer(config, spec.get("words", ()), name),
               num_frames=32, video_kwargs=dict(spec.get("video_kwargs", {})))


def registered_methods() -> list[str]:
    return [m for m in sharp.method_names() if not m.startswith("_") and m != "vanilla"]


def prefill_table(bb, attn: str, cfg: dict, methods: list[str], retention: float, out: Path) -> dict:
    import bench_prefill

    args = bench_prefill.build_parser().parse_args(
        ["--backbone", bb.name, "--methods", *methods, "--retention", str(retention), "--frames", str(cfg["frames"]),
         "--repeats", str(cfg["repeats"]), "--warmup", str(cfg["warmup"]), "--attn", attn,
         "--json", str(out / f"prefill_{bb.name}_{attn}.json"), "--clock", "wall"])
    return bench_prefill.run(args, backbone=bb)


class _Eager:
    """Run the unpruned reference with eager attention on the same weights (the references replace
    every layer's mask by an additive one)."""

    def __init__(self, bb):
        self.configs = {id(layer.self_attn.config): layer.self_attn.config for layer in bb.layers}
        self.configs[id(bb.text_config)] = bb.text_config

    def __enter__(self):
        self.saved = {k: c._attn_implementation for k, c in self.configs.items()}
        for c in self.configs.values():
            c._attn_implementation = "eager"

    def __exit__(self, *exc):
        for k, c in self.configs.items():
            c._attn_implementation = self.saved[k]


def decode_check(bb, method_name: str, retention: float, cfg: dict, new_tokens: int, atol: float) -> dict:
    from engine_reference import Recorder, generate_with_logits, replay_reference_logits
    from test_methods import compact_layers

    inputs = {k: (v.to(bb.device) if torch.is_tensor(v) else v)
              for k, v in bb.synthetic_inputs(frames=cfg["decode_frames"], seed=13).items()}
    method = sharp.resolve_method(method_name, bb, retention).method
    if "sharp" in method_name.split("+") or method_name.endswith("_sharp"):
        method = _no_disk_cache(method)
    recorder = Recorder(method)
    with sharp.prune(bb, method) as trace, torch.no_grad():
        seq, logits = generate_with_logits(bb, inputs, max_new_tokens=new_tokens)
    with _Eager(bb), torch.device(bb.device):  # the reference builds its masks with factory functions
        ref = replay_reference_logits(bb, inputs, seq, trace, recorder,
                                      compact_layers=compact_layers(method, trace, bb.num_layers))
    p = inputs["input_ids"].shape[1]
    ref = ref[:, p - 1: seq.shape[1] - 1].float()
    got = logits.float()
    diff = float((got - ref).abs().max())
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * atol  # steps where the reference's choice is unambiguous
    same_tokens = bool((got.argmax(-1) == ref.argmax(-1))[clear].all())
    return {"method": method_name, "max_abs_logit_diff": diff, "atol": atol, "tokens_equal_where_clear": same_tokens,
            "clear_steps": int(clear.sum()), "steps": int(clear.numel()), "ok": diff <= atol and same_tokens}


def _no_disk_cache(method):
    """ShaRP children write no PosC bias to disk here (a fresh machine, a throwaway check)."""
    from sharp.engine import ComposedMethod

    leaves = method.flat_children() if isinstance(method, ComposedMethod) else [method]
    for leaf in leaves:
        if hasattr(leaf, "_bias_cache"):
            leaf._bias_cache.folder = None
    return method


def markdown(results: dict) -> str:
    info = results["info"]
    lines = [f"# GPU check: {info['device_name']}", "",
             f"torch {info['torch']}, transformers {info['transformers']}, {info['mode']}; total "
             f"{info['elapsed_s']:.0f} s.", ""]
    for run in results["prefill"]:
        lines += [f"## Prefill: {run['backbone']}, {run['attn']}", ""]
        if run.get("error"):
            lines += [f"error: {run['error']}", ""]
            continue
        lines += [run["table"], ""]
    lines += ["## Decode = masked no-cache reference", "",
              "| backbone | attn | method | max |logit diff| | atol | tokens equal (clear steps) | ok |",
              "|---|---|---|---:|---:|---|---|"]
    for r in results["decode"]:
        if r.get("error"):
            lines.append(f"| {r['backbone']} | {r['attn']} | {r['method']} | — | — | error: {r['error']} | no |")
            continue
        lines.append(f"| {r['backbone']} | {r['attn']} | {r['method']} | {r['max_abs_logit_diff']:.3g} | {r['atol']:g} | "
                     f"{r['tokens_equal_where_clear']} ({r['clear_steps']}/{r['steps']}) | {'yes' if r['ok'] else 'NO'} |")
    if results["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny backbones on the CPU (CI)")
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check"))
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--atol", type=float, default=None, help="logit tolerance (default: 0.15 bf16, 2e-4 float32)")
    p.add_argument("--budget-s", type=float, default=450.0)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cfg = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if args.dry_run else "cuda"
    dtype = getattr(torch, cfg["dtype"])
    atol = args.atol if args.atol is not None else (0.15 if dtype == torch.bfloat16 else 2e-4)
    attns = ["sdpa"] + (["flash_attention_2"] if not args.dry_run and flash_available() else [])
    methods = args.methods or registered_methods()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    results = {"info": {"mode": "dry-run (CPU, tiny backbones)" if args.dry_run else "7B random weights, bf16",
                        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__, "attn": attns,
                        "methods": methods, "retention": args.retention, "dtype": cfg["dtype"]},
               "prefill": [], "decode": [], "skipped": []}

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            results["skipped"].append(what)
            print(f"[gpu_check] skipped (budget {args.budget_s:.0f} s): {what}", flush=True)
            return True
        return False

    for name in cfg["backbones"]:
        for attn in attns:
            if over_budget(f"{name}/{attn}"):
                continue
            t0 = time.perf_counter()
            bb = build(name, attn, dtype, device)
            print(f"[gpu_check] built {name} ({attn}, {cfg['dtype']}, {device}) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            run = {"backbone": name, "attn": attn}
            try:
                res = prefill_table(bb, attn, cfg, methods, args.retention, out)
                run.update(table=Path(res["paths"]["md"]).read_text(), rows=res["rows"], vanilla=res["vanilla"],
                           bench_info=res["info"])
            except Exception as err:  # one failing table must not hide the others
                traceback.print_exc()
                run["error"] = f"{type(err).__name__}: {err}"
            results["prefill"].append(run)
            if attn == "sdpa":  # decode = reference once per backbone (the reference is eager anyway)
                for m in methods:
                    if over_budget(f"decode {name}/{m}"):
                        continue
                    try:
                        r = decode_check(bb, m, args.retention, cfg, args.new_tokens, atol)
                    except Exception as err:
                        traceback.print_exc()
                        r = {"method": m, "error": f"{type(err).__name__}: {err}", "ok": False}
                    results["decode"].append({"backbone": name, "attn": attn, **r})
                    print(f"[gpu_check] decode {name} {m}: {r}", flush=True)
            del bb
            if device == "cuda":
                torch.cuda.empty_cache()
    results["info"]["elapsed_s"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {results['info']['elapsed_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
