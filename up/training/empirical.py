"""Data-side second-order reference: sparse context counts (docs/method.md §3, ``empirical``).

For a context c of a token (its scale, optionally the code of its parent at
the previous scale, optionally the class) the reference is the Dirichlet

    alpha_ref(c, v) = n(c, v) + a_0 / V,   kappa_ref(c) = n(c) + a_0,
    p_ref(c) = alpha_ref(c) / kappa_ref(c),

where n(c, v) counts code v in context c over the training tokens. A context
seen rarely keeps p_ref close to the uniform prior, a wide reference; an
unseen context is the uniform distribution. The `up` loss uses p_ref only and
reads it at its own evidence ``up.kappa``, not at kappa_ref (docs/method.md §3).

Contexts (``CONTEXTS``), for the token at scale k, row i, col j:

- ``scale``: (k);
- ``parent``: (k, parent code), the parent being the code at scale k-1, row
  i * p_{k-1} // p_k, col j * p_{k-1} // p_k (scale 0 has the sentinel V);
- ``scale_class`` / ``parent_class``: the same plus the class. The class id C
  means "no class" (label dropped): when fitting, each token is counted under
  its class AND under C, so a label-dropped batch reads the class-marginal
  table, exactly what the model sees for an unconditional row.

A context is one int64 key ((k * (V + 1) + parent) * (C + 1) + class) (unused
fields hold their sentinels V and C), and a (context, code) pair the key
context * V + code. Keys stay below K (V + 1) (C + 1) V (1.7e11 at ImageNet
scale), far inside int64.

Memory. A dense table would need K * V * V * (C + 1) entries (1.7e11 at V =
4096, C = 1000, K = 10), so the counts are stored sparsely, CSR-like:

- ``ctx_keys`` (M,) int64, sorted unique context keys, with ``ctx_totals``
  (M,) int64 = n(c) and ``offsets`` (M + 1,) int64;
- ``pair_keys`` (P,) int64, sorted, and ``pair_counts`` (P,) int32 (int64
  only if a count ever exceeds 2^31 - 1); the pairs of context m are the
  contiguous run offsets[m]:offsets[m + 1] and the code is pair_key % V.

    memory_bytes = 24 M + 8 + 12 P   (20 P with int64 counts)  <=  36 P + 8,

with M <= P (every stored context has at least one pair) and P the number of
distinct (context, code) pairs seen, so P <= N L for the class-free contexts
and P <= 2 N L for the class contexts (each token also counted in the
marginal), N L being the number of training tokens; P is also bounded by the
dense size K (V + 1) (C + 1) V. Fitting peaks at a few times that plus one
chunk of keys.

Look-ups are vectorised over a batch: ``torch.searchsorted`` on ``ctx_keys``
finds each token's context (unseen -> prior only) and the dense (B, L, V)
rows are built only for the batch with repeat_interleave + index_put. The NLL
needs only n(c) and n(c, y), so it never builds (N, L, V).

Leave-one-out. Scoring the training tokens themselves against counts that
include them makes rare contexts look certain: a context seen once reads as
a point mass on the target. ``leave_one_out=True`` removes the token's own
count (alpha(c, y) -= 1, kappa -= 1) so a training batch sees the reference
it would have had without itself; use it when the batch comes from the data
the reference was fitted on.

Layout. Four parts, each with one job, composed by ``EmpiricalReference``:

- ``ContextKeys``: which context a token belongs to (validates a batch of
  token rows and labels, maps each token to its context key, and lists the
  (context, code) counts a training chunk contributes);
- ``CountTable``: the sparse counts n(c, v), n(c) (counting with geometric
  merging, look-ups, the tensors it is saved as, ``to(device)``);
- ``EmpiricalReference``: the Dirichlet posterior over those counts (alpha,
  probs_and_evidence, the predictive probability of a target, leave-one-out);
  it also fits, saves and loads the two parts above as one object;
- ``mean_nll`` / ``mean_nll_per_scale`` / ``select_reference``: the held-out
  NLL of a reference and the choice of context and prior by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

CONTEXTS = ("scale", "parent", "scale_class", "parent_class")
_USES_PARENT = {"scale": False, "parent": True, "scale_class": False, "parent_class": True}
_USES_CLASS = {"scale": False, "parent": False, "scale_class": True, "parent_class": True}
_INT32_MAX = 2 ** 31 - 1
_MERGE_MIN = 1 << 16  # buffered pairs below this are never merged early (tests lower it)


def _check_context(context: str) -> None:
    if context not in CONTEXTS:
        raise ValueError(f"unknown empirical context {context!r}; expected one of {CONTEXTS}")


def _check_prior(prior: float) -> float:
    prior = float(prior)
    if not (prior > 0 and math.isfinite(prior)):
        raise ValueError(f"empirical prior a_0 must be a finite number > 0, got {prior}")
    return prior


# ---------------------------------------------------------------- 1. context keys


def _position_tables(patch_nums: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale index, parent position) of each of the L = sum p_k^2 positions.

    The parent position is -1 at scale 0. Computed once, so a batch's parent
    codes are one gather ``indices[:, parent_pos]``.
    """
    scale, parent = [], []
    start, prev_start, prev_p = 0, 0, 0
    for k, p in enumerate(patch_nums):
        rows = torch.arange(p).repeat_interleave(p)
        cols = torch.arange(p).repeat(p)
        scale.append(torch.full((p * p,), k, dtype=torch.int64))
        if k == 0:
            parent.append(torch.full((p * p,), -1, dtype=torch.int64))
        else:
            parent.append(prev_start + (rows * prev_p // p) * prev_p + cols * prev_p // p)
        prev_start, prev_p = start, p
        start += p * p
    return torch.cat(scale), torch.cat(parent)


class ContextKeys:
    """Which context each token belongs to: one int64 key per token (module doc, Contexts).

    Holds the token layout (patch_nums, V, C) and the context kind; knows
    nothing of counts. ``check`` validates a batch, ``keys`` maps it to context
    keys, ``counted`` lists what a training chunk adds to the counts.
    """

    def __init__(self, patch_nums: Sequence[int], vocab_size: int, num_classes: int, context: str,
                 device: torch.device | str):
        _check_context(context)
        self.patch_nums = [int(p) for p in patch_nums]
        if not self.patch_nums or min(self.patch_nums) < 1:
            raise ValueError(f"patch_nums must be positive integers, got {list(patch_nums)}")
        self.vocab_size = int(vocab_size)
        self.num_classes = int(num_classes)
        if self.vocab_size < 1 or self.num_classes < 0:
            raise ValueError(f"need vocab_size >= 1 and num_classes >= 0, got {vocab_size}, {num_classes}")
        self.context = context
        self.uses_parent, self.uses_class = _USES_PARENT[context], _USES_CLASS[context]
        self.length = sum(p * p for p in self.patch_nums)
        scale_of, parent_pos = _position_tables(self.patch_nums)
        self.scale_of = scale_of.to(device)      # (L,) scale index of each position
        self.parent_pos = parent_pos.to(device)  # (L,) parent position, -1 at scale 0

    @property
    def device(self) -> torch.device:
        return self.scale_of.device

    def to(self, device) -> ContextKeys:
        return ContextKeys(self.patch_nums, self.vocab_size, self.num_classes, self.context, device)

    def check(self, indices: torch.Tensor,
              labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (indices int64 (B, L), labels int64 (B,)); labels None -> all 'no class'."""
        if indices.dim() != 2:
            raise ValueError(f"indices must be (N, L), got shape {tuple(indices.shape)}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.shape[1] != self.length:
            raise ValueError(f"token rows have length {indices.shape[1]}, but patch_nums {self.patch_nums} "
                             f"give sum p_k^2 = {self.length}")
        idx = indices.to(device=self.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"token codes must lie in [0, {self.vocab_size}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if labels is None:
            lab = torch.full((idx.shape[0],), self.num_classes, dtype=torch.int64, device=idx.device)
        else:
            lab = labels.to(device=idx.device, dtype=torch.int64).reshape(-1)
            if lab.numel() != idx.shape[0]:
                raise ValueError(f"got {lab.numel()} labels for {idx.shape[0]} token rows")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) > self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}] "
                                 f"({self.num_classes} = no class), "
                                 f"got range [{int(lab.min())}, {int(lab.max())}]")
        return idx, lab

    def keys(self, idx: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """Context keys (B, L) of validated int64 tokens and labels (class C where unused)."""
        v, c = self.vocab_size, self.num_classes
        b = idx.shape[0]
        scale = self.scale_of.unsqueeze(0).expand(b, -1)
        if self.uses_parent:
            pos = self.parent_pos.clamp(min=0)
            parent = idx[:, pos]
            parent = torch.where(self.parent_pos.unsqueeze(0) < 0, torch.full_like(parent, v), parent)
        else:
            parent = torch.full_like(idx, v)
        if self.uses_class:
            cls = lab.unsqueeze(1).expand(b, self.length)
        else:
            cls = torch.full_like(idx, c)
        return (scale * (v + 1) + parent) * (c + 1) + cls

    def counted(self, idx: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context keys, codes), flat: every count validated training tokens add.

        Each token counts once in its context; with a class context, once more
        under "no class" C (not twice if its label already is C).
        """
        keys, codes = [self.keys(idx, lab).reshape(-1)], [idx.reshape(-1)]
        if self.uses_class:
            real = lab != self.num_classes
            keys.append(self.keys(idx[real], torch.full_like(lab[real], self.num_classes)).reshape(-1))
            codes.append(idx[real].reshape(-1))
        return torch.cat(keys), torch.cat(codes)


# ---------------------------------------------------------------- 2. sparse counts


def _merge_counts(parts: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique pair keys and their summed counts over several (keys, counts)."""
    keys = torch.cat([k for k, _ in parts])
    counts = torch.cat([n for _, n in parts])
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=torch.int64, device=keys.device)
    return uniq, summed.index_add_(0, inverse, counts)


class CountTable:
    """The counts n(c, v) and n(c), stored sparsely, CSR-like (module doc, Memory).

    A (context, code) pair is the key context * V + code. ``count`` builds the
    table from chunks of counted pairs; ``find``, ``target_counts`` and
    ``entries`` read it for a batch of context keys. It knows nothing of
    positions, classes or the prior.
    """

    TENSORS = ("ctx_keys", "ctx_totals", "offsets", "pair_keys", "pair_counts")

    def __init__(self, vocab_size: int, ctx_keys: torch.Tensor, ctx_totals: torch.Tensor,
                 offsets: torch.Tensor, pair_keys: torch.Tensor, pair_counts: torch.Tensor):
        self.vocab_size = int(vocab_size)
        self.ctx_keys, self.ctx_totals, self.offsets = ctx_keys, ctx_totals, offsets
        self.pair_keys, self.pair_counts = pair_keys, pair_counts
        m, p = ctx_keys.numel(), pair_keys.numel()
        if ctx_totals.numel() != m or offsets.numel() != m + 1 or pair_counts.numel() != p:
            raise ValueError("inconsistent empirical reference tables "
                             "(sizes of keys / totals / offsets / counts)")

    @classmethod
    def count(cls, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int,
              device: torch.device) -> CountTable:
        """Count the (context keys, codes) of every chunk, in one pass.

        Each chunk is reduced to its unique pair keys with counts; the chunk
        results are merged into the running table whenever they outgrow it
        (geometric merging), so the peak memory is a few times the final
        table plus one chunk, and the merge cost stays O(P log P) overall.
        """
        v = int(vocab_size)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        run_keys, run_counts = empty, empty
        buffered: list[tuple[torch.Tensor, torch.Tensor]] = []
        buffered_size = 0
        for keys, codes in chunks:
            uniq, counts = torch.unique(keys * v + codes, sorted=True, return_counts=True)
            buffered.append((uniq, counts))
            buffered_size += uniq.numel()
            if buffered_size >= max(run_keys.numel(), _MERGE_MIN):
                run_keys, run_counts = _merge_counts([(run_keys, run_counts)] + buffered)
                buffered, buffered_size = [], 0
        if buffered:
            run_keys, run_counts = _merge_counts([(run_keys, run_counts)] + buffered)

        ctx_of_pair = torch.div(run_keys, v, rounding_mode="floor")
        ctx_keys, per_ctx = torch.unique_consecutive(ctx_of_pair, return_counts=True)
        offsets = torch.zeros(ctx_keys.numel() + 1, dtype=torch.int64, device=run_keys.device)
        torch.cumsum(per_ctx, 0, out=offsets[1:])
        ctx_index = torch.repeat_interleave(torch.arange(ctx_keys.numel(), device=run_keys.device), per_ctx)
        totals = torch.zeros(ctx_keys.numel(), dtype=torch.int64, device=run_keys.device).index_add_(
            0, ctx_index, run_counts)
        if run_counts.numel() == 0 or int(run_counts.max()) <= _INT32_MAX:
            run_counts = run_counts.to(torch.int32)
        return cls(v, ctx_keys, totals, offsets, run_keys, run_counts)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in ctx_keys, found) of flat context keys."""
        m = self.ctx_keys.numel()
        if m == 0:
            zeros = torch.zeros_like(keys)
            return zeros, torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self.ctx_keys, keys).clamp(max=m - 1)
        return pos, self.ctx_keys[pos] == keys

    def target_counts(self, keys: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n(c), n(c, y)) int64 for flat context keys and target codes; 0 where unseen."""
        pos, found = self.find(keys)
        n_c = torch.where(found, self.ctx_totals[pos] if self.ctx_totals.numel() else torch.zeros_like(keys),
                          torch.zeros_like(keys))
        pair = keys * self.vocab_size + codes
        p = self.pair_keys.numel()
        if p == 0:
            return n_c, torch.zeros_like(keys)
        ppos = torch.searchsorted(self.pair_keys, pair).clamp(max=p - 1)
        hit = self.pair_keys[ppos] == pair
        n_cy = torch.where(hit, self.pair_counts[ppos].to(torch.int64), torch.zeros_like(keys))
        return n_c, n_cy

    def entries(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, code, n(c, code)) of every stored pair of each flat key's context: row i of a
        dense (len(keys), V) table gets these counts (none for an unseen context).

        The runs offsets[m]:offsets[m + 1] of the found contexts are expanded
        with repeat_interleave, so only the batch's rows are ever built.
        """
        pos, found = self.find(keys)
        tok = torch.nonzero(found).squeeze(1)
        start = self.offsets[pos[tok]]
        lengths = self.offsets[pos[tok] + 1] - start
        rows = torch.repeat_interleave(tok, lengths)
        run_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        within = torch.arange(rows.numel(), device=keys.device) - run_start
        pidx = torch.repeat_interleave(start, lengths) + within
        return rows, torch.remainder(self.pair_keys[pidx], self.vocab_size), self.pair_counts[pidx]

    @property
    def num_contexts(self) -> int:
        return self.ctx_keys.numel()

    @property
    def num_pairs(self) -> int:
        return self.pair_keys.numel()

    def memory_bytes(self) -> int:
        """24 M + 8 + 12 P (int32 counts), see the module doc."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The five tables by name (the order of ``TENSORS``)."""
        return {name: getattr(self, name) for name in self.TENSORS}

    def to(self, device) -> CountTable:
        return CountTable(self.vocab_size, **{name: t.to(device) for name, t in self.tensors().items()})


# ---------------------------------------------------------------- 3. the Dirichlet posterior


def _view(part: str, name: str, doc: str) -> property:
    """A read-only attribute of one of EmpiricalReference's parts."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class EmpiricalReference:
    """Sparse Dirichlet reference alpha_ref(c) = n(c, .) + a_0 / V (see module doc).

    ``keys`` (ContextKeys) says which context a token is in, ``table``
    (CountTable) holds n(c, v), ``prior`` is a_0. ``fit`` counts a token
    cache; ``with_prior`` shares the counts under another a_0.
    """

    patch_nums = _view("keys", "patch_nums", "patch_nums of the token rows")
    vocab_size = _view("keys", "vocab_size", "V")
    num_classes = _view("keys", "num_classes", "C (label C = no class)")
    context = _view("keys", "context", "one of CONTEXTS")
    length = _view("keys", "length", "L = sum p_k^2")
    ctx_keys = _view("table", "ctx_keys", "(M,) int64 sorted context keys")
    ctx_totals = _view("table", "ctx_totals", "(M,) int64 n(c)")
    offsets = _view("table", "offsets", "(M + 1,) int64 runs of each context's pairs")
    pair_keys = _view("table", "pair_keys", "(P,) int64 sorted context * V + code")
    pair_counts = _view("table", "pair_counts", "(P,) int32 (or int64) n(c, v)")
    num_contexts = _view("table", "num_contexts", "M, the number of distinct contexts seen")
    num_pairs = _view("table", "num_pairs", "P, the number of distinct (context, code) pairs seen")

    def __init__(self, keys: ContextKeys, table: CountTable, prior: float):
        if table.vocab_size != keys.vocab_size:
            raise ValueError(f"count table has V = {table.vocab_size}, context keys V = {keys.vocab_size}")
        self.keys, self.table = keys, table
        self.prior = _check_prior(prior)

    @classmethod
    def fit(cls, indices: torch.Tensor, labels: torch.Tensor | None, patch_nums: Sequence[int],
            vocab_size: int, num_classes: int, context: str, prior: float,
            chunk: int = 4096) -> EmpiricalReference:
        """Count n(c, v) over a token cache (N, L) in one pass of ``chunk`` images at a time
        (see ``CountTable.count`` for the memory)."""
        _check_context(context)
        prior = _check_prior(prior)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        keys = ContextKeys(patch_nums, vocab_size, num_classes, context, indices.device)
        idx, lab = keys.check(indices, labels)
        chunks = (keys.counted(idx[start:start + chunk], lab[start:start + chunk])
                  for start in range(0, idx.shape[0], chunk))
        return cls(keys, CountTable.count(chunks, keys.vocab_size, idx.device), prior)

    def with_prior(self, prior: float) -> EmpiricalReference:
        """The same counts under another a_0 (tables shared, not copied): prior search is free."""
        return EmpiricalReference(self.keys, self.table, prior)

    def context_keys(self, indices: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The int64 context key (B, L) of every token; labels == C reads the class marginal."""
        return self.keys.keys(*self.keys.check(indices, labels))

    def alpha(self, indices: torch.Tensor, labels: torch.Tensor | None,
              leave_one_out: bool = False) -> torch.Tensor:
        """alpha_ref (B, L, V) float32 = n(c, .) + a_0 / V for every token's context.

        Dense rows are built for the batch only (``CountTable.entries``, one
        index_put). ``leave_one_out`` subtracts the token's own count (see the
        module doc); the batch must then come from the fitting data.
        """
        idx, lab = self.keys.check(indices, labels)
        b, length, v = idx.shape[0], idx.shape[1], self.vocab_size
        keys = self.keys.keys(idx, lab).reshape(-1)
        out = torch.full((keys.numel(), v), self.prior / v, dtype=torch.float32, device=keys.device)
        rows, codes, counts = self.table.entries(keys)
        if rows.numel():
            out.index_put_((rows, codes), counts.to(torch.float32), accumulate=True)
        if leave_one_out:
            self._remove_self(out, idx.reshape(-1), keys)
        return out.reshape(b, length, v)

    def _remove_self(self, out: torch.Tensor, codes: torch.Tensor, keys: torch.Tensor) -> None:
        """alpha(c, y) -= 1 in place where the pair (c, y) was counted."""
        _, n_cy = self.table.target_counts(keys, codes)
        seen = torch.nonzero(n_cy > 0).squeeze(1)
        out[seen, codes[seen]] -= 1.0

    def probs_and_evidence(self, indices: torch.Tensor, labels: torch.Tensor | None,
                           leave_one_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_ref (B, L, V), kappa_ref (B, L)) float32: the reference mean and its evidence n(c) + a_0."""
        a = self.alpha(indices, labels, leave_one_out=leave_one_out)
        kappa = a.sum(-1)
        return a / kappa.unsqueeze(-1), kappa

    def target_nll(self, idx: torch.Tensor, lab: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
        """-log p_ref(y | c) (B, L) float64 of validated tokens, from n(c) and n(c, y) alone
        (p_ref(y | c) = (n(c, y) + a_0 / V) / (n(c) + a_0), without building (B, L, V))."""
        keys = self.keys.keys(idx, lab).reshape(-1)
        n_c, n_cy = self.table.target_counts(keys, idx.reshape(-1))
        if leave_one_out:
            dec = (n_cy > 0).to(torch.int64)
            n_c, n_cy = n_c - dec, n_cy - dec
        a0 = self.prior
        p = (n_cy.to(torch.float64) + a0 / self.vocab_size) / (n_c.to(torch.float64) + a0)
        return -torch.log(p).reshape(idx.shape)

    def nll(self, indices: torch.Tensor, labels: torch.Tensor | None, chunk: int = 256,
            leave_one_out: bool = False) -> float:
        """``mean_nll`` of this reference."""
        return mean_nll(self, indices, labels, chunk, leave_one_out)

    def nll_per_scale(self, indices: torch.Tensor, labels: torch.Tensor | None, chunk: int = 256,
                      leave_one_out: bool = False) -> list[float]:
        """``mean_nll_per_scale`` of this reference."""
        return mean_nll_per_scale(self, indices, labels, chunk, leave_one_out)

    # ------------------------------------------------------------ saving

    def memory_bytes(self) -> int:
        """Bytes of the stored tables: 24 M + 8 + 12 P (int32 counts), see the module doc."""
        return self.table.memory_bytes()

    def state_dict(self) -> dict:
        """Plain tensors (on CPU) and ints/strings, for torch.save. Each tensor is cloned:
        a table's keys are a view into a larger, partly uninitialised buffer, whose stale
        tail would otherwise be saved too and make equal tables differ byte for byte."""
        return dict(version=1, patch_nums=list(self.patch_nums), vocab_size=self.vocab_size,
                    num_classes=self.num_classes, context=self.context, prior=self.prior,
                    **{name: t.cpu().clone() for name, t in self.table.tensors().items()})

    @classmethod
    def from_state_dict(cls, state: dict) -> EmpiricalReference:
        """Inverse of state_dict (validates the table sizes)."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported empirical reference state version {state.get('version')!r}")
        keys = ContextKeys(state["patch_nums"], state["vocab_size"], state["num_classes"], state["context"],
                           state["ctx_keys"].device)
        table = CountTable(state["vocab_size"], **{name: state[name] for name in CountTable.TENSORS})
        return cls(keys, table, state["prior"])

    def to(self, device) -> EmpiricalReference:
        """A copy whose tables live on ``device`` (look-ups run where the tables are)."""
        return EmpiricalReference(self.keys.to(device), self.table.to(device), self.prior)

    def __repr__(self) -> str:
        return (f"EmpiricalReference(context={self.context!r}, prior={self.prior}, V={self.vocab_size}, "
                f"C={self.num_classes}, contexts={self.num_contexts}, pairs={self.num_pairs}, "
                f"bytes={self.memory_bytes()})")


# ---------------------------------------------------------------- 4. held-out NLL and selection


def _nll_sums(ref: EmpiricalReference, indices: torch.Tensor, labels: torch.Tensor | None, chunk: int,
              leave_one_out: bool) -> tuple[torch.Tensor, int]:
    """(sum of -log p_ref per scale (K,) float64, number of images), in chunks of images."""
    idx_all, lab_all = ref.keys.check(indices, labels)
    chunk = max(int(chunk), 1)
    sums = torch.zeros(len(ref.patch_nums), dtype=torch.float64, device=idx_all.device)
    for start in range(0, idx_all.shape[0], chunk):
        nll = ref.target_nll(idx_all[start:start + chunk], lab_all[start:start + chunk], leave_one_out)
        sums.index_add_(0, ref.keys.scale_of, nll.sum(0))
    return sums, idx_all.shape[0]


def mean_nll(ref: EmpiricalReference, indices: torch.Tensor, labels: torch.Tensor | None,
             chunk: int = 256, leave_one_out: bool = False) -> float:
    """Mean -log p_ref(y | c) over all N L tokens without building (N, L, V): reads n(c), n(c, y) only."""
    sums, n = _nll_sums(ref, indices, labels, chunk, leave_one_out)
    return float(sums.sum() / (n * ref.length)) if n else float("nan")


def mean_nll_per_scale(ref: EmpiricalReference, indices: torch.Tensor, labels: torch.Tensor | None,
                       chunk: int = 256, leave_one_out: bool = False) -> list[float]:
    """Mean -log p_ref(y | c) within each scale (K values): where the reference is sharp or flat."""
    sums, n = _nll_sums(ref, indices, labels, chunk, leave_one_out)
    if not n:
        return [float("nan")] * len(ref.patch_nums)
    per_scale = torch.tensor([p * p for p in ref.patch_nums], dtype=torch.float64, device=sums.device)
    return (sums / (n * per_scale)).tolist()


def select_reference(train_indices: torch.Tensor, train_labels: torch.Tensor | None,
                     heldout_indices: torch.Tensor, heldout_labels: torch.Tensor | None,
                     patch_nums: Sequence[int], vocab_size: int, num_classes: int, contexts: Sequence[str],
                     priors: Sequence[float], chunk: int = 4096) -> tuple[EmpiricalReference, list[dict]]:
    """Fit each (context, prior), score held-out NLL, return the best and the table of rows.

    Rows are {context, prior, heldout_nll, contexts_seen, pairs, memory_bytes},
    one per (context, prior) in the given order. Counts depend only on the
    context, so they are fitted once per context and the prior is varied with
    ``with_prior`` (no refit). Ties go to the first row, so list the cheaper
    contexts first.
    """
    contexts, priors = list(contexts), [_check_prior(p) for p in priors]
    if not contexts or not priors:
        raise ValueError("select_reference needs at least one context and one prior")
    for c in contexts:
        _check_context(c)
    best, best_nll, rows = None, math.inf, []
    for context in contexts:
        base = EmpiricalReference.fit(train_indices, train_labels, patch_nums, vocab_size, num_classes,
                                      context, priors[0], chunk=chunk)
        for prior in priors:
            ref = base.with_prior(prior)
            nll = mean_nll(ref, heldout_indices, heldout_labels)
            rows.append(dict(context=context, prior=prior, heldout_nll=nll, contexts_seen=ref.num_contexts,
                             pairs=ref.num_pairs, memory_bytes=ref.memory_bytes()))
            if nll < best_nll:
                best, best_nll = ref, nll
    if best is None:  # every NLL was NaN (empty held-out set): nothing to compare
        raise ValueError("held-out NLL is undefined (empty held-out set?); cannot select a reference")
    return best, rows
