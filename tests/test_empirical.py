"""The sparse empirical reference (up.training.empirical) against hand counts and its own cheap paths."""

import io
import math

import pytest
import torch

import up.training.empirical as empirical
from up.training.empirical import (
    CONTEXTS,
    ContextKeys,
    CountTable,
    EmpiricalReference,
    mean_nll,
    mean_nll_per_scale,
    select_reference,
)

# patch_nums [1, 2], V = 3, C = 2 (label 2 = no class), L = 5: three images written out by hand.
PN, V, C, A0 = [1, 2], 3, 2, 1.5
TOKENS = torch.tensor([[2, 0, 1, 1, 2],    # class 0, scale-0 code 2
                       [2, 1, 1, 0, 0],    # class 1, scale-0 code 2
                       [0, 0, 0, 0, 1]],   # class 0, scale-0 code 0
                      dtype=torch.int16)
LABELS = torch.tensor([0, 1, 0])


def fit(context, prior=A0, tokens=TOKENS, labels=LABELS, **kw):
    return EmpiricalReference.fit(tokens, labels, PN, V, C, context, prior, **kw)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_parent_class_counts_match_hand_count():
    ref = fit("parent_class")
    a0v = A0 / V
    query = torch.tensor([[2, 0, 0, 0, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    alpha = ref.alpha(query, torch.tensor([0, C, 1]))
    # class 0: scale 0 saw codes {2, 0}; scale 1 under parent 2 saw [0, 1, 1, 2]
    assert torch.equal(alpha[0, 0], t(1, 0, 1) + a0v)
    assert torch.equal(alpha[0, 1], t(1, 2, 1) + a0v)
    # no class = marginal over classes: scale 0 {2, 2, 0}; parent 2 -> [0,1,1,2] + [1,1,0,0]
    assert torch.equal(alpha[1, 0], t(1, 0, 2) + a0v)
    assert torch.equal(alpha[1, 4], t(3, 4, 1) + a0v)
    # class 1: scale 0 saw {2}; (scale 1, parent 0, class 1) was never seen -> uniform, kappa = a0
    assert torch.equal(alpha[2, 0], t(0, 0, 1) + a0v)
    p, kappa = ref.probs_and_evidence(query, torch.tensor([0, C, 1]))
    assert torch.allclose(p[2, 1], torch.full((V,), 1 / V))
    assert kappa[2, 1].item() == pytest.approx(A0)
    assert kappa[1, 4].item() == pytest.approx(8 + A0)
    # the marginal under parent 0 is class 0's alone
    alpha0 = ref.alpha(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, C]))
    assert torch.equal(alpha0[0, 1], t(3, 1, 0) + a0v)
    assert torch.equal(alpha0[1, 1], t(3, 1, 0) + a0v)


def test_class_free_contexts_ignore_the_label():
    ref = fit("scale")
    a0v = A0 / V
    alpha = ref.alpha(TOKENS[:2], torch.tensor([0, 1]))
    assert torch.equal(alpha[0, 0], t(1, 0, 2) + a0v)
    assert torch.equal(alpha[1, 3], t(6, 5, 1) + a0v)
    assert torch.equal(alpha[0], alpha[1])
    par = fit("parent")
    assert torch.equal(par.alpha(TOKENS[:1], None)[0, 1], t(3, 4, 1) + a0v)
    sc = fit("scale_class")
    assert torch.equal(sc.alpha(TOKENS[:1], torch.tensor([1]))[0, 2], t(2, 2, 0) + a0v)
    assert torch.equal(sc.alpha(TOKENS[:1], torch.tensor([C]))[0, 2], t(6, 5, 1) + a0v)


def test_label_already_dropped_is_counted_once():
    ref = fit("scale_class", labels=torch.tensor([0, C, 0]))
    alpha = ref.alpha(TOKENS[:1], torch.tensor([C]))
    assert alpha[0, 0].sum().item() == pytest.approx(3 + A0)   # three images, not four
    assert ref.alpha(TOKENS[:1], torch.tensor([1]))[0, 0].sum().item() == pytest.approx(A0)  # class 1 unseen


@pytest.mark.parametrize("context", CONTEXTS)
def test_probs_sum_to_one_and_kappa_is_count_plus_prior(context):
    g = torch.Generator().manual_seed(1)
    pn, v, c = [1, 2, 3], 7, 3
    tokens = torch.randint(0, v, (30, 14), generator=g)
    labels = torch.randint(0, c, (30,), generator=g)
    ref = EmpiricalReference.fit(tokens, labels, pn, v, c, context, 0.7)
    query = torch.randint(0, v, (5, 14), generator=g)
    qlab = torch.tensor([0, 1, 2, c, 0])
    alpha = ref.alpha(query, qlab)
    p, kappa = ref.probs_and_evidence(query, qlab)
    assert torch.allclose(p.sum(-1), torch.ones(5, 14), atol=1e-6)
    assert torch.allclose(kappa, alpha.sum(-1))
    counts = (alpha - 0.7 / v).sum(-1)
    assert torch.allclose(counts, counts.round(), atol=1e-4)      # n(c) is an integer count
    assert torch.allclose(kappa, counts.round() + 0.7, atol=1e-4)


def test_parent_mapping_by_hand():
    pn, v, c = [1, 2, 4], 32, 2
    ref = EmpiricalReference.fit(torch.zeros(1, 21, dtype=torch.long), None, pn, v, c, "parent", 1.0)
    codes = torch.arange(21).unsqueeze(0)           # the code at each position is its position
    keys = ref.context_keys(codes, None)[0]
    parent = (keys // (c + 1)) % (v + 1)
    scale = keys // ((c + 1) * (v + 1))
    assert parent[0].item() == v                     # scale 0 has no parent: sentinel V
    assert parent[1:5].tolist() == [0, 0, 0, 0]      # all of scale 1 hangs off the single scale-0 token
    assert scale.tolist() == [0] + [1] * 4 + [2] * 16

    def at(i, j):                                    # scale 2 (4 x 4) position (i, j)
        return parent[5 + 4 * i + j].item()

    # parent at scale 1 (2 x 2): (i // 2, j // 2), stored at 1 + 2 * row + col
    assert at(0, 0) == 1 and at(0, 3) == 2 and at(1, 2) == 2
    assert at(3, 0) == 3 and at(2, 3) == 4 and at(3, 3) == 4


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_nll_equals_gathered_alpha(leave_one_out):
    g = torch.Generator().manual_seed(2)
    pn, v, c = [1, 2, 3], 6, 3
    tokens = torch.randint(0, v, (40, 14), generator=g, dtype=torch.int32)
    labels = torch.randint(0, c + 1, (40,), generator=g)
    ref = EmpiricalReference.fit(tokens, labels, pn, v, c, "parent_class", 0.9)
    # the training set itself (leave-one-out meaningful) plus a fresh set with unseen contexts
    fresh = torch.randint(0, v, (9, 14), generator=g), torch.randint(0, c + 1, (9,), generator=g)
    for idx, lab in [(tokens, labels), fresh]:
        if leave_one_out and idx is not tokens:
            continue
        p, _ = ref.probs_and_evidence(idx, lab, leave_one_out=leave_one_out)
        expected = -torch.log(p.double().gather(-1, idx.long().unsqueeze(-1))).squeeze(-1)
        nll = ref.nll(idx, lab, chunk=7, leave_one_out=leave_one_out)
        assert nll == pytest.approx(expected.mean().item(), rel=1e-6)
        per_scale = ref.nll_per_scale(idx, lab, chunk=5, leave_one_out=leave_one_out)
        assert per_scale == pytest.approx([expected[:, :1].mean().item(), expected[:, 1:5].mean().item(),
                                           expected[:, 5:].mean().item()], rel=1e-6)


def test_leave_one_out_removes_the_token_itself():
    ref = fit("parent_class")
    loo = ref.alpha(TOKENS, LABELS, leave_one_out=True)
    full = ref.alpha(TOKENS, LABELS)
    onehot = torch.nn.functional.one_hot(TOKENS.long(), V).float()
    assert torch.allclose(full - loo, onehot)
    # image 1 is the only class-1 image: its scale-0 context becomes empty -> uniform prior
    assert torch.allclose(loo[1, 0], torch.full((V,), A0 / V))


def test_chunked_fit_with_merges_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 5, (25, 14), generator=g).to(torch.int16)
    labels = torch.randint(0, 3, (25,), generator=g)
    one = EmpiricalReference.fit(tokens, labels, [1, 2, 3], 5, 2, "parent_class", 1.0, chunk=1000)
    monkeypatch.setattr(empirical, "_MERGE_MIN", 1)
    many = EmpiricalReference.fit(tokens, labels, [1, 2, 3], 5, 2, "parent_class", 1.0, chunk=3)
    for name in ("ctx_keys", "ctx_totals", "offsets", "pair_keys", "pair_counts"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name
    assert int(one.ctx_totals.sum()) == 2 * tokens.numel() - 14 * int((labels == 2).sum())


def _synthetic(n, class_matters, g, pn=(1, 2, 3), v=16, c=4):
    labels = torch.randint(0, c, (n,), generator=g)
    length = sum(p * p for p in pn)
    if class_matters:   # each class uses its own four codes
        tokens = labels.unsqueeze(1) * 4 + torch.randint(0, 4, (n, length), generator=g)
    else:               # one skewed distribution for every class
        probs = torch.tensor([2.0 ** -i for i in range(v)])
        tokens = torch.multinomial(probs, n * length, replacement=True, generator=g).reshape(n, length)
    return tokens, labels


@pytest.mark.parametrize("class_matters", [True, False])
def test_select_reference_picks_lower_heldout_nll(class_matters):
    g = torch.Generator().manual_seed(4)
    train = _synthetic(40, class_matters, g)
    held = _synthetic(20, class_matters, g)
    contexts, priors = ["scale", "scale_class"], [0.5, 4.0, 16.0]
    best, rows = select_reference(*train, *held, [1, 2, 3], 16, 4, contexts, priors)
    assert [(r["context"], r["prior"]) for r in rows] == [(c, p) for c in contexts for p in priors]
    assert set(rows[0]) == {"context", "prior", "heldout_nll", "contexts_seen", "pairs", "memory_bytes"}
    winner = min(rows, key=lambda r: r["heldout_nll"])
    assert (best.context, best.prior) == (winner["context"], winner["prior"])
    assert best.nll(*held) == pytest.approx(winner["heldout_nll"])
    assert best.context == ("scale_class" if class_matters else "scale")
    assert all(math.isfinite(r["heldout_nll"]) for r in rows)


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 9, (20, 14), generator=g)
    labels = torch.randint(0, 4, (20,), generator=g)
    ref = EmpiricalReference.fit(tokens, labels, [1, 2, 3], 9, 3, "parent_class", 2.5)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    back = EmpiricalReference.from_state_dict(torch.load(buffer))
    assert (back.context, back.prior, back.patch_nums) == ("parent_class", 2.5, [1, 2, 3])
    assert torch.equal(back.alpha(tokens, labels), ref.alpha(tokens, labels))
    assert back.nll(tokens, labels) == ref.nll(tokens, labels)
    assert torch.equal(back.to("cpu").alpha(tokens[:2], labels[:2]), ref.alpha(tokens[:2], labels[:2]))


def test_saved_table_holds_only_its_entries_so_equal_tables_save_equal_bytes():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 9, (20, 14), generator=g)
    labels = torch.randint(0, 4, (20,), generator=g)
    state = EmpiricalReference.fit(tokens, labels, [1, 2, 3], 9, 3, "parent_class", 2.5).state_dict()
    for name, value in state.items():
        if torch.is_tensor(value):  # no stale tail of a larger buffer goes into the file
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name


def test_memory_is_sparse_and_grows_with_pairs():
    g = torch.Generator().manual_seed(6)
    pn, v, c = [1, 2, 3, 4, 6, 8], 512, 10
    length = sum(p * p for p in pn)
    tokens = torch.randint(0, v, (40, length), generator=g, dtype=torch.int32)
    labels = torch.randint(0, c, (40,), generator=g)
    small = EmpiricalReference.fit(tokens[:10], labels[:10], pn, v, c, "parent_class", 1.0)
    large = EmpiricalReference.fit(tokens, labels, pn, v, c, "parent_class", 1.0)
    dense = len(pn) * v * v * (c + 1) * 4
    for ref, n in [(small, 10), (large, 40)]:
        m, p = ref.num_contexts, ref.num_pairs
        assert ref.memory_bytes() == 24 * m + 8 + 12 * p      # the documented formula (int32 counts)
        assert m <= p <= 2 * n * length                          # bounded by (2x) the training tokens
        assert ref.memory_bytes() < dense / 100
    assert large.num_pairs > small.num_pairs and large.memory_bytes() > small.memory_bytes()


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="unknown empirical context"):
        fit("grandparent")
    with pytest.raises(ValueError, match="prior"):
        fit("scale", prior=0.0)
    with pytest.raises(ValueError, match="prior"):
        fit("scale").with_prior(-1.0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fit("scale", tokens=TOKENS.clone().index_fill_(1, torch.tensor([2]), 3))
    with pytest.raises(ValueError, match="sum p_k"):
        fit("scale", tokens=TOKENS[:, :4])
    ref = fit("parent_class")
    with pytest.raises(ValueError, match="sum p_k"):
        ref.alpha(torch.zeros(1, 6, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        ref.alpha(TOKENS[:1], torch.tensor([C + 1]))
    with pytest.raises(ValueError, match="integer"):
        ref.nll(TOKENS.float(), LABELS)
    with pytest.raises(ValueError, match="unknown empirical context"):
        select_reference(TOKENS, LABELS, TOKENS, LABELS, PN, V, C, ["scale", "nope"], [1.0])


# -- the parts on their own: keys, count table, posterior, NLL (module doc, Layout) ----------


def test_context_keys_by_hand():
    """key = (scale (V + 1) + parent) (C + 1) + class, scale 0's parent being the sentinel V = 3;
    a training token counts under its class and again under "no class" C = 2."""
    keys = ContextKeys(PN, V, C, "parent_class", "cpu")
    idx, lab = keys.check(TOKENS, LABELS)
    assert keys.keys(idx, lab).tolist() == [[9] + [18] * 4,    # class 0: (3) 3 + 0, (4 + 2) 3 + 0
                                            [10] + [19] * 4,   # class 1, parent 2
                                            [9] + [12] * 4]    # class 0, parent 0
    ctx, codes = keys.counted(idx, lab)
    assert ctx.tolist() == [9] + [18] * 4 + [10] + [19] * 4 + [9] + [12] * 4 \
        + [11] + [20] * 4 + [11] + [20] * 4 + [11] + [14] * 4
    assert codes.tolist() == TOKENS.flatten().tolist() * 2
    dropped = keys.counted(*keys.check(TOKENS, torch.tensor([0, C, 0])))[0]
    assert dropped.numel() == 15 + 10                          # image 1 counted once
    scale = ContextKeys(PN, V, C, "scale", "cpu")
    assert scale.keys(idx, lab).unique().tolist() == [11, 23]  # (0 + 3) 3 + 2, (4 + 3) 3 + 2
    assert scale.counted(idx, lab)[0].numel() == 15            # no class: no marginal copy


# Counts of the class-free `scale` context (keys 11 and 23) in two chunks:
# context 11 saw codes 2, 2, 0, 2 and context 23 saw 0, 1.
CHUNKS = [(torch.tensor([11, 11, 11]), torch.tensor([2, 2, 0])),
          (torch.tensor([23, 23, 11]), torch.tensor([0, 1, 2]))]


@pytest.mark.parametrize("merge_min", [1 << 16, 1])
def test_count_table_by_hand(merge_min, monkeypatch):
    monkeypatch.setattr(empirical, "_MERGE_MIN", merge_min)   # 1: merged after every chunk
    table = CountTable.count(iter(CHUNKS), V, torch.device("cpu"))
    assert table.ctx_keys.tolist() == [11, 23] and table.ctx_totals.tolist() == [4, 2]
    assert table.offsets.tolist() == [0, 2, 4]
    assert table.pair_keys.tolist() == [11 * V + 0, 11 * V + 2, 23 * V + 0, 23 * V + 1]
    assert table.pair_counts.tolist() == [1, 3, 1, 1] and table.pair_counts.dtype == torch.int32
    assert table.memory_bytes() == 24 * 2 + 8 + 12 * 4
    n_c, n_cy = table.target_counts(torch.tensor([11, 11, 23, 5]), torch.tensor([2, 1, 1, 0]))
    assert n_c.tolist() == [4, 4, 2, 0] and n_cy.tolist() == [3, 0, 1, 0]
    rows, codes, counts = table.entries(torch.tensor([5, 23, 11]))   # 5 was never seen
    assert rows.tolist() == [1, 1, 2, 2] and codes.tolist() == [0, 1, 0, 2]
    assert counts.tolist() == [1, 1, 1, 3]
    empty = CountTable.count(iter([]), V, torch.device("cpu"))
    assert empty.num_contexts == empty.num_pairs == 0 and empty.offsets.tolist() == [0]
    assert [x.tolist() for x in empty.entries(torch.tensor([11]))] == [[], [], []]


def test_posterior_and_nll_by_hand():
    """p(y | c) = (n(c, y) + a_0 / V) / (n(c) + a_0) over the hand table; leave-one-out
    removes the token's own count only where it was counted."""
    table = CountTable.count(iter(CHUNKS), V, torch.device("cpu"))
    ref = EmpiricalReference(ContextKeys(PN, V, C, "scale", "cpu"), table, A0)
    a0v = A0 / V
    query = torch.tensor([[2, 0, 1, 2, 2]])
    alpha = ref.alpha(query, None)
    assert torch.equal(alpha[0, 0], t(1, 0, 3) + a0v)
    assert all(torch.equal(alpha[0, i], t(1, 1, 0) + a0v) for i in range(1, 5))
    _, kappa = ref.probs_and_evidence(query, None)
    assert kappa[0].tolist() == [4 + A0] + [2 + A0] * 4
    loo = ref.alpha(query, None, leave_one_out=True)
    assert torch.equal(loo[0, 0], t(1, 0, 2) + a0v)            # (11, 2) was counted
    assert torch.equal(loo[0, 3], alpha[0, 3])                 # (23, 2) never was
    expected = [(3 + a0v) / (4 + A0), (1 + a0v) / (2 + A0), (1 + a0v) / (2 + A0), a0v / (2 + A0),
                a0v / (2 + A0)]
    nll = ref.target_nll(*ref.keys.check(query, None), leave_one_out=False)
    assert nll[0].tolist() == pytest.approx([-math.log(p) for p in expected])
    assert mean_nll(ref, query, None) == pytest.approx(-sum(math.log(p) for p in expected) / 5)
    assert mean_nll_per_scale(ref, query, None) == pytest.approx(
        [-math.log(expected[0]), -sum(math.log(p) for p in expected[1:]) / 4])
    loo_expected = [(2 + a0v) / (3 + A0), a0v / (1 + A0), a0v / (1 + A0), a0v / (2 + A0), a0v / (2 + A0)]
    nll = ref.target_nll(*ref.keys.check(query, None), leave_one_out=True)
    assert nll[0].tolist() == pytest.approx([-math.log(p) for p in loo_expected])


def test_fit_is_the_parts_composed():
    """fit = ContextKeys.counted per chunk -> CountTable.count; the `scale` counts of TOKENS."""
    ref = fit("scale", chunk=2)
    assert ref.table.ctx_keys.tolist() == [11, 23] and ref.table.ctx_totals.tolist() == [3, 12]
    assert ref.table.pair_keys.tolist() == [33, 35, 69, 70, 71]
    assert ref.table.pair_counts.tolist() == [1, 2, 6, 5, 1]
    assert ref.with_prior(3.0).table is ref.table                # prior search shares the counts
    state = ref.state_dict()
    assert list(state) == ["version", "patch_nums", "vocab_size", "num_classes", "context", "prior",
                           "ctx_keys", "ctx_totals", "offsets", "pair_keys", "pair_counts"]
