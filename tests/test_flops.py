"""sharp.flops reproduces the paper's TFLOPs (Tables 1-2) and orders conventions sensibly."""
import pytest

from sharp.flops import layer_flops, lm_dims, match_retention, prefill_tflops


@pytest.mark.parametrize("method,retention,paper", [
    ("vanilla", 1.0, 40.8), ("fastv", 0.25, 11.0), ("fastv", 0.20, 9.31), ("fastv", 0.15, 7.66), ("fastv", 0.10, 6.03),
])
def test_llava_onevision_table1(method, retention, paper):
    assert prefill_tflops("llava_onevision_7b", method, retention) == pytest.approx(paper, rel=0.01)


@pytest.mark.parametrize("method,retention,paper", [("vanilla", 1.0, 16.7), ("fastv", 0.20, 4.1), ("fastv", 0.10, 2.6)])
def test_qwen2_vl_table2(method, retention, paper):
    assert prefill_tflops("qwen2_vl_7b", method, retention) == pytest.approx(paper, rel=0.01)


def test_paper_formula_by_hand():
    d = lm_dims("llava_onevision_7b")
    n = 6272
    assert layer_flops(n, d) == 4 * n * 3584**2 + 2 * n * n * 3584 + 2 * n * 3584 * 18944
    # FastV keeps all tokens in layers 0..K-1
    k, kept = 2, round(0.25 * n)
    expected = (k * layer_flops(n, d) + (28 - k) * layer_flops(kept, d)) / 1e12
    assert prefill_tflops("llava_onevision_7b", "fastv", 0.25) == pytest.approx(expected, rel=1e-12)


def test_exact_convention_counts_swiglu_and_gqa():
    d = lm_dims("qwen2_vl_7b")
    exact, paper = layer_flops(1000, d, "exact"), layer_flops(1000, d, "paper")
    assert exact > paper  # three MLP matrices outweigh GQA's smaller k/v and causal halving
    with pytest.raises(ValueError, match="unknown FLOPs convention 'x'.*paper, exact"):
        prefill_tflops("qwen2_vl_7b", convention="x")


def test_flops_matching_search():
    # FastV at layer 1 (ShaRP's schedule without RegD) must match FastV at layer 2 with more tokens
    r = match_retention("llava_onevision_7b", "fastv", "fastv", 0.25, layer=1)
    assert r == pytest.approx(0.282, abs=0.002)  # Table 1: ShaRP 28.2% <-> FastV 25%
    assert prefill_tflops("llava_onevision_7b", "fastv", r, layer=1) == pytest.approx(11.0, rel=0.002)
