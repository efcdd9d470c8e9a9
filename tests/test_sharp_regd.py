"""RegD (ShaRP Sec. 4.3): hand-computed steps, the readings as options, and a loop reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import sharp.methods.regd as regd_mod
from sharp.methods import budget
from sharp.methods.regd import regd, sequential_pivots


def deg(*angles):
    """Unit vectors in the plane at the given angles (degrees)."""
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])


def ids(*segs):
    return torch.tensor(segs, dtype=torch.long)


# ------------------------------------------------------------------------- sequential passes
def test_sequential_pivots_pivot_vs_adjacent():
    x = deg(0, 30, 60, 90, 100)
    tau = math.cos(math.radians(45))
    # pivot: 30 vs 0 absorbed; 60 vs pivot 0 (cos 60) -> new pivot; 90, 100 vs pivot 60 absorbed
    assert sequential_pivots(x, tau, mode="pivot").tolist() == [0, 0, 2, 2, 2]
    # adjacent: every step is 30 degrees or less -> one run owned by token 0
    assert sequential_pivots(x, tau, mode="adjacent").tolist() == [0, 0, 0, 0, 0]


def test_sequential_pivots_segments_and_ties():
    x = deg(0, 30, 60, 90, 100)
    tau = math.cos(math.radians(45))
    seg = ids(0, 0, 1, 1, 1)
    assert sequential_pivots(x, tau, seg, "pivot").tolist() == [0, 0, 2, 2, 2]
    assert sequential_pivots(x, tau, seg, "adjacent").tolist() == [0, 0, 2, 2, 2]
    seg = ids(0, 1, 2, 3, 4)  # one-token segments: everyone is a pivot
    assert sequential_pivots(x, tau, seg, "pivot").tolist() == [0, 1, 2, 3, 4]
    # similarity exactly equal to tau is not "exceeds": orthogonal vectors, tau = 0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert sequential_pivots(x, 0.0, mode="pivot").tolist() == [0, 1, 1]
    assert sequential_pivots(x[:0], 0.5).tolist() == []
    assert sequential_pivots(x[:1], 0.5).tolist() == [0]


def _loop_pivots(x, tau, mode):
    own, pivot = [0] * len(x), 0
    for i in range(1, len(x)):
        ref = pivot if mode == "pivot" else i - 1
        if float(x[i] @ x[ref]) > tau:
            own[i] = pivot
        else:
            pivot = own[i] = i
    return own


@pytest.mark.parametrize("chunk", [3, 2048])
def test_sequential_pivots_matches_loop(monkeypatch, chunk):
    monkeypatch.setattr(regd_mod, "_ROW_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        m = int(torch.randint(1, 30, (1,), generator=g))
        x = F.normalize(torch.randn(m, 3, generator=g) + torch.tensor([1.5, 0, 0]), dim=-1)
        tau = float(torch.rand(1, generator=g)) * 1.2 - 0.2
        for mode in ("pivot", "adjacent"):
            assert sequential_pivots(x, tau, mode=mode).tolist() == _loop_pivots(x, tau, mode)


# ------------------------------------------------------------------------- hand-made RegD
def _one_segment_case():
    # tok angle  role      what happens
    # 0    0     register  pivot
    # 1    10    register  dedup: cos 10 = .985 > .8 vs pivot 0 -> absorbed into 0
    # 2    90    register  dedup: cos 90 = 0 -> new pivot
    # 3    3     non-reg   filter: max cos to {0,10,90} = cos 3 (token 0) > .7 -> absorbed into 0
    # 4    180   non-reg   filter: best cos 0 (token 2) -> H'_nreg, opens cluster C0
    # 5    200   non-reg   filter: best cos -.34 -> H'_nreg; cos to C0's first (180) = .94 > .4 -> C0
    # 6    270   non-reg   filter: best cos 0 (token 0) -> H'_nreg; cos to 180 = 0 -> opens C1
    # 7    45    non-reg   filter: cos to 0/10/90 = .707/.819/.707 -> absorbed into 1 (10 deg)
    h = deg(0, 10, 90, 3, 180, 200, 270, 45)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5])
    return h, scores, torch.tensor([0, 1, 2]), ids(*[0] * 8)


def test_regd_one_segment_hand():
    h, s, reg, seg = _one_segment_case()
    r = regd(h, s, reg, seg, absorb="drop")
    assert r.filtered.tolist() == [3, 7]
    assert r.deduplicated.tolist() == [1]
    assert r.registers_after_dedup.tolist() == [0, 2]
    # Div (Eq. 6) vs H'_reg = {0 deg, 90 deg}: C0 (centre 180, |C|=2): 1 - (-1 + 0)/2 + 2 beta = 1.516
    # C1 (centre 270, |C|=1): 1 - (0 - 1)/2 + beta = 1.508 -> one slot to refill: centre 4
    assert r.centres.tolist() == [4] and r.fallback.tolist() == []
    assert r.keep.tolist() == [0, 2, 4]
    assert r.kept_hidden is None
    # ownership: 1 (dedup), 3 (filter) -> 0; 7 (filtered into 1, which dedup absorbed) -> 0
    assert r.owner.tolist() == [0, 0, 2, 0, 4, -1, -1, 0]
    # with beta = 0 the two centres tie on diversity up to float error; with a negative beta the
    # smaller cluster wins: beta really weighs |C_k|
    assert regd(h, s, reg, seg, beta=-0.1).keep.tolist() == [0, 2, 6]
    assert set(r.times) == {"filter", "dedup", "fill"}


def test_regd_absorb_mean_hand():
    h, s, reg, seg = _one_segment_case()
    h = h * torch.arange(1, 9).unsqueeze(1)  # different norms: a plain mean, not a mean of directions
    r = regd(h, s, reg, seg, absorb="mean")
    assert r.keep.tolist() == [0, 2, 4]
    out = r.apply(h)
    assert r.kept_hidden.shape == (3, 2)
    assert torch.allclose(out[0], h[[0, 1, 3, 7]].mean(0))  # itself + dedup + filtered, transitively
    assert torch.equal(out[2], h[2]) and torch.equal(out[4], h[4])  # absorbed nothing
    assert torch.equal(out[[1, 3, 5, 6, 7]], h[[1, 3, 5, 6, 7]])  # dropped rows untouched


def test_regd_dedup_readings_differ():
    # registers at 0, 30, 60 deg; tau_merge = cos 45: pivot reading keeps 0 and 60,
    # adjacent reading absorbs the whole run into 0. One non-register token far away refills.
    h = deg(0, 30, 60, 200)
    s = torch.tensor([1.0, 0.9, 0.8, 0.1])
    reg, seg = torch.tensor([0, 1, 2]), ids(0, 0, 0, 0)
    tau = math.cos(math.radians(45))
    p = regd(h, s, reg, seg, tau_filter=0.99, tau_merge=tau, dedup="pivot")
    a = regd(h, s, reg, seg, tau_filter=0.99, tau_merge=tau, dedup="adjacent")
    assert p.registers_after_dedup.tolist() == [0, 2] and p.keep.tolist() == [0, 2, 3]
    assert a.registers_after_dedup.tolist() == [0]
    # adjacent: 2 slots, 1 centre (token 3) then the fallback: absorbed tokens by score -> 1
    assert a.centres.tolist() == [3] and a.fallback.tolist() == [1] and a.keep.tolist() == [0, 1, 3]


def test_regd_cluster_readings_differ():
    # H'_nreg = 180, 220, 260 deg; tau_cluster = cos 50: "first" compares with 180 -> {180, 220},
    # {260}; "adjacent" chains 40-degree steps -> one cluster {180, 220, 260}
    h = deg(0, 5, 180, 220, 260)
    s = torch.tensor([1.0, 0.9, 0.1, 0.2, 0.3])
    reg, seg = torch.tensor([0, 1]), ids(0, 0, 0, 0, 0)
    kw = dict(tau_filter=0.99, tau_cluster=math.cos(math.radians(50)), beta=0.1)
    first = regd(h, s, reg, seg, cluster="first", **kw)
    adj = regd(h, s, reg, seg, cluster="adjacent", **kw)
    # first: Div(180) = 1 - cos180 + 2 beta = 2.2 ; Div(260) = 1 - cos100 + beta = 1.27 -> 180
    assert first.centres.tolist() == [2]
    assert adj.centres.tolist() == [2]  # the only cluster
    # beta = -1 penalises size: "first" now prefers the singleton {260} (Div 0.17 vs 0.0),
    # "adjacent" still has a single cluster
    kw["beta"] = -1.0
    assert regd(h, s, reg, seg, cluster="first", **kw).centres.tolist() == [4]
    assert regd(h, s, reg, seg, cluster="adjacent", **kw).centres.tolist() == [2]


def _two_segment_case():
    # segment A (frames 0..0 = tokens 0..3), segment B (tokens 4..7), 4 tokens per frame
    # A: 0 (0 deg, reg), 1 (5, reg -> dedup into 0), 2 (100, H'_nreg centre, |C| = 2), 3 (120, joins)
    # B: 4 (0, reg), 5 (180, centre, |C| = 3), 6 (190), 7 (185)
    h = deg(0, 5, 100, 120, 0, 180, 190, 185)
    s = torch.tensor([0.9, 0.8, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1])
    return h, s, torch.tensor([0, 1, 4]), ids(0, 0, 0, 0, 1, 1, 1, 1)


def test_regd_fill_segment_vs_global():
    h, s, reg, seg = _two_segment_case()
    # Div A centre (100): 1 - cos 100 + 2 beta = 1.1896 ; Div B centre (180): 1 + 1 + 3 beta = 2.024
    per_seg = regd(h, s, reg, seg, fill="segment")
    glob = regd(h, s, reg, seg, fill="global")
    assert per_seg.deduplicated.tolist() == [1]
    assert per_seg.centres.tolist() == [2] and per_seg.keep.tolist() == [0, 2, 4]
    assert glob.centres.tolist() == [5] and glob.keep.tolist() == [0, 4, 5]
    # one segment instead: no pass crosses the boundary any more -> 4 (0 deg) is a duplicate of 0
    one = regd(h, s, reg, ids(*[0] * 8), fill="segment")
    assert one.deduplicated.tolist() == [1, 4]
    assert one.keep.numel() == 3


def test_regd_one_token_segments():
    # 4 identical tokens, one frame (= one token) per segment: nothing crosses segments
    h = deg(0, 0, 0, 0)
    s = torch.tensor([0.4, 0.3, 0.2, 0.1])
    r = regd(h, s, torch.tensor([0, 2]), ids(0, 1, 2, 3))
    assert r.filtered.tolist() == [] and r.deduplicated.tolist() == [] and r.keep.tolist() == [0, 2]
    # the same tokens in one segment: 1 and 3 are filtered into 0 (tie between 0 and 2: the
    # earliest register wins), 2 is a duplicate of 0; nothing left to cluster -> fallback by score
    r = regd(h, s, torch.tensor([0, 2]), ids(0, 0, 0, 0), absorb="mean")
    assert r.filtered.tolist() == [1, 3] and r.deduplicated.tolist() == [2]
    assert r.centres.tolist() == [] and r.fallback.tolist() == [1] and r.keep.tolist() == [0, 1]
    assert r.owner.tolist() == [0, 1, 0, 0]  # 1 is back (kept, owns itself); 2, 3 end in 0


def test_regd_fallback_order():
    # registers 0, 1, 2 near 0 deg (2 duplicates); 3 filtered into 1; 4 far (a centre);
    # need 2: centre 4 first, then no H'_nreg member left, then absorbed tokens by score (3 > 1, 2)
    h = deg(0, 1, 2, 1.2, 180)
    s = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.0])
    r = regd(h, s, torch.tensor([0, 1, 2]), ids(0, 0, 0, 0, 0), absorb="mean")
    assert r.filtered.tolist() == [3] and r.deduplicated.tolist() == [1, 2]
    assert r.centres.tolist() == [4] and r.fallback.tolist() == [3]
    assert r.keep.tolist() == [0, 3, 4]
    out = r.apply(h)
    assert torch.allclose(out[0], h[[0, 1, 2]].mean(0))  # 3 is back: not merged
    assert torch.equal(out[3], h[3])


def test_regd_retention_one_keeps_everything():
    h = deg(0, 1, 2, 90, 91)
    r = regd(h, torch.rand(5), torch.arange(5), ids(0, 0, 0, 0, 0), absorb="mean")
    assert r.keep.tolist() == [0, 1, 2, 3, 4]
    assert r.kept_hidden is None and r.apply(h) is h  # everything put back: nothing stays merged


def test_regd_rejects_bad_input():
    h, s, reg, seg = _one_segment_case()
    with pytest.raises(ValueError):
        regd(h, s, reg, seg, absorb="sum")
    with pytest.raises(ValueError):
        regd(h, s, reg, seg, dedup="nope")
    with pytest.raises(ValueError):
        regd(h, s, torch.tensor([], dtype=torch.long), seg)
    with pytest.raises(ValueError):
        regd(h, s, reg, ids(1, 1, 1, 1, 0, 0, 0, 0))


# ------------------------------------------------------------------------- loop reference
def reference_regd(h, scores, registers, seg, tau_filter, tau_merge, tau_cluster, beta, dedup, cluster, fill,
                   centre="first", out=None):
    """Token-by-token loops straight from the text of Sec. 4.3 (with docs/sharp.md's readings).
    ``out`` (a dict) receives the clusters: centre token -> its members (first member first)."""
    x = F.normalize(h.float(), dim=-1)
    n = len(h)
    gram = (x @ x.T).tolist()
    sim = lambda i, j: gram[i][j]  # noqa: E731
    seg = seg.tolist()
    regs = sorted(registers.tolist())
    is_reg = set(regs)
    absorber = [-1] * n
    for i in range(n):  # (1) pre-filtering
        if i in is_reg:
            continue
        cands = [r for r in regs if seg[r] == seg[i]]
        if cands:
            best = max(cands, key=lambda r: (sim(i, r), -r))
            if sim(i, best) > tau_filter:
                absorber[i] = best
    for s in sorted(set(seg)):  # (2) deduplication
        pivot = prev = None
        for r in [r for r in regs if seg[r] == s]:
            if pivot is not None and sim(r, pivot if dedup == "pivot" else prev) > tau_merge:
                absorber[r] = pivot
            else:
                pivot = r
            prev = r
    kept_reg = [r for r in regs if absorber[r] < 0]
    need = len(regs) - len(kept_reg)
    rest = [i for i in range(n) if i not in is_reg and absorber[i] < 0]
    clusters = []  # (3) post-filling: member lists, in order
    for s in sorted(set(seg)):
        cur = prev = None
        for i in [i for i in rest if seg[i] == s]:
            if cur is not None and sim(i, cur[0] if cluster == "first" else prev) > tau_cluster:
                cur.append(i)
            else:
                cur = [i]
                clusters.append(cur)
            prev = i
    div = {}
    for members_c in clusters:
        if centre == "medoid":  # the member with the largest summed similarity to the members
            summed = {i: sum(sim(i, j) for j in members_c) for i in members_c}
            c = next(i for i in members_c if summed[i] >= max(summed.values()) - 1e-5)  # ties: the earliest
            vec = x[c]
        else:
            c = members_c[0]
            vec = F.normalize(h[members_c].float().mean(0), dim=-1) if centre == "mean" else x[c]
        if out is not None:
            out[c] = members_c
        regs_s = [r for r in kept_reg if seg[r] == seg[c]]
        mean_sim = sum(float(vec @ x[r]) for r in regs_s) / len(regs_s) if regs_s else 0.0
        div[c] = 1 - mean_sim + beta * len(members_c)
    by_div = sorted(div, key=lambda c: (-div[c], c))
    chosen = []
    if fill == "segment":
        for s in sorted(set(seg)):
            quota = sum(seg[r] == s for r in regs) - sum(seg[r] == s for r in kept_reg)
            chosen += [c for c in by_div if seg[c] == s][:quota]
    order = chosen + [c for c in by_div if c not in chosen]
    members = [i for i in rest if i not in div]
    absorbed = [i for i in range(n) if absorber[i] >= 0]
    order += sorted(members, key=lambda i: (-float(scores[i]), i))
    order += sorted(absorbed, key=lambda i: (-float(scores[i]), i))
    return sorted(kept_reg + order[:need])


@pytest.mark.parametrize("seed", range(3))
def test_regd_centres_match_loop_reference(seed):
    """centre="medoid" / "mean" against the loop reference; "mean" forwards each refilled centre as the
    plain mean of its cluster's members that are not kept themselves."""
    g = torch.Generator().manual_seed(100 + seed)
    for trial in range(10):
        n = int(torch.randint(8, 40, (1,), generator=g))
        h = _clustered(g, n, 5, int(torch.randint(1, 4, (1,), generator=g)), 0.6)
        h = h * (torch.rand(n, 1, generator=g) + 0.5)  # different norms: a plain mean, not of directions
        scores = torch.rand(n, generator=g)
        seg = torch.arange(n) * int(torch.randint(1, 4, (1,), generator=g)) // n
        k = budget(n, float(torch.rand(1, generator=g)) * 0.5 + 0.2)
        registers = torch.topk(scores, k).indices
        kw = dict(tau_filter=0.95, tau_merge=0.5, tau_cluster=float(torch.rand(1, generator=g)) * 0.6, beta=0.008)
        for centre in ("first", "medoid", "mean"):
            clusters = {}
            expected = reference_regd(h, scores, registers, seg, dedup="pivot", cluster="first", fill="segment",
                                      centre=centre, out=clusters, **kw)
            r = regd(h, scores, registers, seg, absorb="drop", centre=centre, **kw)
            assert r.keep.tolist() == expected, (seed, trial, centre)
            assert set(r.centres.tolist()) <= set(clusters)
            if centre != "mean":
                assert r.kept_hidden is None
                continue
            out = r.apply(h)
            kept = set(r.keep.tolist())
            for c in r.centres.tolist():
                rows = [c] + [i for i in clusters[c] if i not in kept]
                assert torch.allclose(out[c], h[rows].mean(0), atol=1e-6)
                assert all(int(r.owner[i]) == c for i in rows)


def _clustered(g, n, d, k_protos, noise):
    protos = F.normalize(torch.randn(k_protos, d, generator=g), dim=-1)
    assign = torch.randint(0, k_protos, (n,), generator=g)
    return protos[assign] + noise * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("seed", range(4))
def test_regd_matches_loop_reference_and_budget(seed, monkeypatch):
    monkeypatch.setattr(regd_mod, "_ROW_CHUNK", 7)  # exercise the chunked similarity blocks
    g = torch.Generator().manual_seed(seed)
    for trial in range(8):
        frames = int(torch.randint(1, 6, (1,), generator=g))
        tpf = int(torch.randint(1, 9, (1,), generator=g))
        n = frames * tpf
        h = _clustered(g, n, 6, int(torch.randint(1, 5, (1,), generator=g)), float(torch.rand(1, generator=g)))
        scores = torch.rand(n, generator=g)
        cuts = sorted(set(torch.randint(1, frames + 1, (2,), generator=g).tolist()) - {frames})
        firsts = [0] + cuts
        segs = list(zip(firsts, [f - 1 for f in firsts[1:]] + [frames - 1]))
        seg = torch.repeat_interleave(
            torch.arange(len(segs)), torch.tensor([(b - a + 1) * tpf for a, b in segs])
        )
        retention = float(torch.rand(1, generator=g)) * 0.9 + 0.1
        k = budget(n, retention)
        registers = torch.topk(scores, k).indices
        kw = dict(
            tau_filter=float(torch.rand(1, generator=g)) * 0.6 + 0.3,
            tau_merge=float(torch.rand(1, generator=g)) * 0.6 + 0.3,
            tau_cluster=float(torch.rand(1, generator=g)) * 0.8,
            beta=0.008,
        )
        for dedup in ("pivot", "adjacent"):
            for cluster in ("first", "adjacent"):
                for fill in ("segment", "global"):
                    # the selection does not depend on `absorb`: one "mean" run checks both
                    r = regd(h, scores, registers, seg, dedup=dedup, cluster=cluster, fill=fill, absorb="mean", **kw)
                    assert r.keep.numel() == k == torch.unique(r.keep).numel()
                    assert 0 <= int(r.keep.min()) and int(r.keep.max()) < n
                    assert set(r.registers_after_dedup.tolist()) <= set(r.keep.tolist())
                    kept = set(r.keep.tolist())
                    assert all((o in kept) for o in r.owner.tolist() if o >= 0)
                    expected = reference_regd(h, scores, registers, seg, dedup=dedup, cluster=cluster, fill=fill, **kw)
                    assert r.keep.tolist() == expected, (seed, trial, dedup, cluster, fill)
                    # each kept row = the plain mean of the tokens that end in it
                    own = r.owner[r.owner >= 0]
                    sums = torch.zeros_like(h).index_add_(0, own, h[r.owner >= 0])
                    mean = sums[r.keep] / torch.bincount(own, minlength=n)[r.keep].unsqueeze(1)
                    assert torch.allclose(r.apply(h)[r.keep], mean, atol=1e-6)
        d = regd(h, scores, registers, seg, absorb="drop", **kw)
        assert d.kept_hidden is None and d.apply(h) is h
        assert d.keep.tolist() == regd(h, scores, registers, seg, absorb="mean", **kw).keep.tolist()


def test_regd_budget_at_paper_scale():
    # LLaVA-OV layout: 32 frames x 196 tokens, retention 0.282 -> exactly 1769 tokens, fast
    g = torch.Generator().manual_seed(0)
    n = 32 * 196
    h = _clustered(g, n, 32, 40, 0.3)
    scores = torch.rand(n, generator=g)
    seg = torch.arange(n) // (196 * 8)  # 4 segments
    for retention in (0.282, 0.5):
        k = budget(n, retention)
        r = regd(h, scores, torch.topk(scores, k).indices, seg)
        assert r.keep.numel() == k


# ------------------------------------------------------------------------- vectorised helpers = per-segment loops
# RegD's similarities must be bit-identical to those of a loop over segments that multiplies each segment's own
# rows (a product's float rounding depends on its shape), so these references read every similarity off that
# segment's own matrix product and walk the tokens one by one; thresholds are often set to one of those very
# values (exact ties) and rows are duplicated (equal similarities), so a rounding difference would show.
def _random_rows(g, m, d, protos=3, noise=0.4):
    rows = _clustered(g, m, d, protos, noise)
    if m > 2:  # exact duplicates: equal similarities, first-maximum ties
        rows[torch.randint(0, m, (m // 3,), generator=g)] = rows[torch.randint(0, m, (m // 3,), generator=g)]
    return F.normalize(rows, dim=-1)


def _random_sizes(g, m, empty=True):
    """Segment sizes summing to m (some empty when ``empty``)."""
    cuts = torch.sort(torch.randint(0, m + 1, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)).values
    sizes = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([m])])).tolist()
    return sizes if empty else [s for s in sizes if s] or [m]


def _tie_tau(g, values):
    """A threshold: often one of the similarities themselves (an exact tie), else a float32 value."""
    if values and float(torch.rand(1, generator=g)) < 0.5:
        return values[int(torch.randint(0, len(values), (1,), generator=g))]
    return float(torch.tensor(float(torch.rand(1, generator=g)) * 1.4 - 0.4, dtype=torch.float32))


def _loop_owners_from_blocks(x, tau, sizes, mode, chunk):
    """Sequential pass, token by token, reading cos(pivot, later) off each segment's own product:
    ``block[r0:r1] @ block[r0:].T`` in row chunks of ``chunk`` (row = the earlier token); "adjacent" reads
    ``(x[1:] * x[:-1]).sum(-1)`` as RegD always did. Also returns every block similarity read (for ties)."""
    owners, seen, start = [], [], 0
    adjacent = (x[1:] * x[:-1]).sum(-1).tolist()
    for size in sizes:
        block = x[start:start + size]
        sim = {}
        for r0 in range(0, size, chunk):
            part = (block[r0:r0 + chunk] @ block[r0:].T).tolist()
            for a, row in enumerate(part):
                for b, v in enumerate(row):
                    sim[r0 + a, r0 + b] = v
        seen += [sim[a, b] for a in range(size) for b in range(a + 1, size)]
        pivot = 0
        for a in range(size):
            if a and (sim[pivot, a] if mode == "pivot" else adjacent[start + a - 1]) > tau:
                owners.append(start + pivot)
            else:
                pivot = a
                owners.append(start + a)
        start += size
    return owners, seen


@pytest.mark.parametrize("chunk,tile", [(2048, 1 << 16), (3, 1 << 16), (2048, 20), (4, 30)])
def test_owners_equal_the_per_segment_loop(monkeypatch, chunk, tile):
    """``_owners`` / ``sequential_pivots`` (block-diagonal tiles, strided "later" view, pointer doubling) equal
    the token-by-token pass over each segment's own product, ties included, empty segments included."""
    monkeypatch.setattr(regd_mod, "_ROW_CHUNK", chunk)
    monkeypatch.setattr(regd_mod, "_TILE_ENTRIES", tile)
    g = torch.Generator().manual_seed(11)
    for trial in range(100):
        m = int(torch.randint(1, 40, (1,), generator=g))
        x = _random_rows(g, m, int(torch.randint(2, 9, (1,), generator=g)))
        sizes = _random_sizes(g, m)
        counts = torch.tensor(sizes)
        for mode in ("pivot", "adjacent"):
            expected, seen = _loop_owners_from_blocks(x, 0.0, sizes, mode, chunk)
            tau = _tie_tau(g, seen)
            expected, _ = _loop_owners_from_blocks(x, tau, sizes, mode, chunk)
            owner, is_pivot = regd_mod._owners(regd_mod._Grouped.of(x, counts), tau, mode)
            assert owner.tolist() == expected, (trial, mode, sizes, tau)
            assert is_pivot.tolist() == [o == i for i, o in enumerate(expected)]
            seg = torch.repeat_interleave(torch.arange(len(sizes)), counts)
            assert sequential_pivots(x, tau, seg, mode).tolist() == expected


def test_chains_pointer_doubling_equal_walking():
    """``_chains``: rows reached from the segment starts by following ``next``, with log2 of the longest
    segment doubling steps, against walking the pointers."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        sizes = _random_sizes(g, int(torch.randint(1, 50, (1,), generator=g)))
        m = sum(sizes)
        nxt, start = [], 0
        for size in sizes:  # any pointer to a later row of the segment, or its end
            for a in range(size):
                nxt.append(int(torch.randint(start + a + 1, start + size + 1, (1,), generator=g)))
            start += size
        reached, start = set(), 0
        for size in sizes:
            i = start
            while i < start + size:
                reached.add(i)
                i = nxt[i]
            start += size
        counts = torch.tensor(sizes)
        starts = torch.cumsum(counts, 0) - counts
        got = regd_mod._chains(torch.tensor(nxt + [m]), starts, (max(sizes) - 1).bit_length())
        assert got.tolist() == [i in reached for i in range(m)]


@pytest.mark.parametrize("tile", [1 << 16, 12])
def test_prefilter_equals_the_per_segment_loop(monkeypatch, tile):
    """Pre-filtering (one block-diagonal tile, each row gathering its own segment's columns) equals the loop that
    multiplies ``x[nonreg_s] @ x[reg_s].T`` per segment and takes the first maximum, ties included."""
    monkeypatch.setattr(regd_mod, "_TILE_ENTRIES", tile)
    g = torch.Generator().manual_seed(5)
    for trial in range(150):
        n = int(torch.randint(1, 40, (1,), generator=g))
        h = _random_rows(g, n, int(torch.randint(2, 9, (1,), generator=g))) * (torch.rand(n, 1, generator=g) + 0.5)
        seg = torch.repeat_interleave(torch.arange(len(sizes := _random_sizes(g, n, empty=False))), torch.tensor(sizes))
        registers = torch.sort(torch.randperm(n, generator=g)[: int(torch.randint(1, n + 1, (1,), generator=g))]).values
        x = F.normalize(h.float(), dim=-1, eps=1e-12)
        is_reg = torch.zeros(n, dtype=torch.bool)
        is_reg[registers] = True
        nonreg = torch.arange(n)[~is_reg]
        blocks, seen = {}, []
        for s in range(len(sizes)):  # the loop RegD replaced: fresh per-segment gathers, one product each
            non_s, reg_s = nonreg[seg[nonreg] == s], registers[seg[registers] == s]
            if len(non_s) and len(reg_s):
                blocks[s] = (non_s.tolist(), reg_s.tolist(), (x[non_s] @ x[reg_s].T).tolist())
                seen += [v for row in blocks[s][2] for v in row]
        tau = _tie_tau(g, seen)
        expected = [-1] * n
        for non_s, reg_s, sim in blocks.values():
            for i, row in zip(non_s, sim):
                if max(row) > tau:
                    expected[i] = reg_s[row.index(max(row))]  # first maximum
        reg_counts = torch.bincount(seg[registers], minlength=len(sizes))
        non_counts = torch.tensor(sizes) - reg_counts
        order = torch.cat([registers, nonreg])
        xs = regd_mod._unit_rows(h, order)
        k = len(registers)
        absorber = torch.full((n,), -1)
        hit = regd_mod._prefilter(regd_mod._Grouped.of(xs[k:], non_counts), regd_mod._Grouped.of(xs[:k], reg_counts),
                                  nonreg, registers, tau, absorber)
        assert absorber.tolist() == expected, (trial, tau)
        assert hit.tolist() == [expected[i] >= 0 for i in nonreg.tolist()]


def test_unit_rows_equal_normalize():
    """The gathered unit rows are bit for bit ``F.normalize(hidden.float())`` rows, any dtype, zero rows too."""
    g = torch.Generator().manual_seed(2)
    for d in (3, 17, 64, 1000):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            h = (torch.randn(30, d, generator=g) * 3).to(dtype)
            h[4] = 0
            rows = torch.randperm(30, generator=g)
            assert torch.equal(regd_mod._unit_rows(h, rows), F.normalize(h.float(), dim=-1, eps=1e-12)[rows])


def _centre_order_reference(div, c_seg, quota):
    """``fill="segment"`` as RegD ranked it before: each segment's quota of centres by Div, segment after segment,
    then ranked by Div (stable), then the other centres by Div."""
    by_div = torch.sort(div, descending=True, stable=True).indices
    order = by_div[torch.sort(c_seg[by_div], stable=True).indices]
    seg_sorted = c_seg[order]
    rank = torch.arange(order.numel()) - torch.searchsorted(seg_sorted, seg_sorted, right=False)
    chosen = order[rank < quota[seg_sorted]]
    chosen = chosen[torch.sort(div[chosen], descending=True, stable=True).indices]
    taken = torch.zeros(div.numel(), dtype=torch.bool)
    taken[chosen] = True
    return torch.cat([chosen, by_div[~taken[by_div]]])


def test_centre_order_equals_the_segment_by_segment_ranking():
    g = torch.Generator().manual_seed(7)
    for _ in range(300):
        c = int(torch.randint(0, 25, (1,), generator=g))
        n_seg = int(torch.randint(1, 6, (1,), generator=g))
        c_seg = torch.sort(torch.randint(0, n_seg, (c,), generator=g)).values  # centres in sequence order
        div = torch.round(torch.rand(c, generator=g) * 4) / 4  # many exact ties
        if c and float(torch.rand(1, generator=g)) < 0.2:
            div[int(torch.randint(0, c, (1,), generator=g))] = float("nan")
        quota = torch.randint(0, 4, (n_seg,), generator=g)
        got = regd_mod._centre_order(div, c_seg, quota, "segment")
        assert got.tolist() == _centre_order_reference(div, c_seg, quota).tolist()
        assert regd_mod._centre_order(div, c_seg, quota, "global").tolist() == torch.sort(
            div, descending=True, stable=True).indices.tolist()


def test_final_owners_follow_the_absorber_chains():
    g = torch.Generator().manual_seed(9)
    for _ in range(200):
        n = int(torch.randint(1, 30, (1,), generator=g))
        keep = torch.sort(torch.randperm(n, generator=g)[: int(torch.randint(1, n + 1, (1,), generator=g))]).values
        kept = set(keep.tolist())
        # chains of at most two hops into a kept token (filtered -> deduplicated register -> pivot)
        role = torch.randint(0, 3, (n,), generator=g).tolist()  # 0: dropped, 1: into a kept token, 2: via a mid
        mids = [i for i in range(n) if i not in kept and role[i] == 1]
        absorber = [-1] * n
        for i in range(n):
            if i not in kept and (role[i] == 1 or (role[i] == 2 and not mids)):
                absorber[i] = int(keep[int(torch.randint(0, len(keep), (1,), generator=g))])
            elif i not in kept and role[i] == 2:
                absorber[i] = mids[int(torch.randint(0, len(mids), (1,), generator=g))]
        expected = []
        for i in range(n):
            o = i
            while o >= 0 and o not in kept:
                o = absorber[o]
            expected.append(o)
        owner, kept_mask = regd_mod._final_owners(keep, torch.tensor(absorber))
        assert owner.tolist() == expected
        assert kept_mask.tolist() == [i in kept for i in range(n)]


def test_segment_groups_cover_in_order_within_budget(monkeypatch):
    monkeypatch.setattr(regd_mod, "_TILE_ENTRIES", 50)
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        s = int(torch.randint(1, 12, (1,), generator=g))
        a, b = torch.randint(0, 9, (s,), generator=g).tolist(), torch.randint(0, 9, (s,), generator=g).tolist()
        alone = [None, 5][int(torch.randint(0, 2, (1,), generator=g))]
        groups = list(regd_mod._segment_groups(a, b, alone_above=alone))
        assert groups[0][0] == 0 and groups[-1][1] == s
        for (s0, s1, a0, a1, b0, b1), nxt in zip(groups, groups[1:] + [None]):
            assert (a0, a1, b0, b1) == (sum(a[:s0]), sum(a[:s1]), sum(b[:s0]), sum(b[:s1]))
            assert s1 > s0 and (nxt is None or nxt[0] == s1)
            assert s1 - s0 == 1 or (a1 - a0) * (b1 - b0) <= 50
            if alone is not None and s1 - s0 > 1:
                assert max(a[s0:s1]) <= alone
