"""Token losses for next-scale prediction, one value per token.

Cross-entropy, the two baselines that soften it (label smoothing, label
relaxation) and the uncertainty-preserving loss (docs/method.md §2-§3): CE plus a
penalty on the gap between the second-order dispersion of the prediction and
that of a reference (both read at one evidence mass kappa), plus a
semantic-entropy term; and knowledge distillation from a frozen teacher (the
control of a teacher-referenced `up`). The caller weights tokens (uniform,
per scale) and reduces.

Each loss is declared once at the end (:class:`LossDeclaration`): its
params.yaml tag and settings model, its module, the context and reference it
needs and whether it needs the teacher model. ``LOSSES``, the typed variants
(:func:`check_variants`) and the training step's loss are read from there, so
a new loss is a module, its declaration and its test (and a params.yaml entry).

The measures they share with sampling live in up/models/uncertainty.py.
Shapes: logits (..., V), targets (...) long; every loss returns (...).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn
from torch.autograd.function import once_differentiable

from up.core.params import PARAMS_FILE, Params, ParamsError, Section, describe_error
from up.models import temperature
from up.models.uncertainty import cluster_probs, dirichlet_variance, safe_log, semantic_entropy

# Floor of a Dirichlet variance before its square root in the W2 penalty:
# d sqrt(v)/dv = 1 / (2 sqrt v) is infinite at v = 0 (a probability that
# underflowed to 0, or exactly 1 in float32). Flooring at 1e-12 caps the
# derivative at 5e5 and moves a standard deviation by at most 1e-6.
VAR_FLOOR = 1e-12


# --------------------------------------------------------------------------
# Baselines


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(y) per token."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def _target_log_prob(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _smoothing(log_probs: torch.Tensor, targets: torch.Tensor, epsilon: float):
    """(smoothed loss, plain CE) from one log-softmax."""
    nll = -_target_log_prob(log_probs, targets)
    return (1.0 - epsilon) * nll - epsilon * log_probs.mean(-1), nll


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Cross-entropy to (1 - epsilon) onehot(y) + epsilon / V (VAR has the option, default 0)."""
    return _smoothing(F.log_softmax(logits, -1), targets, epsilon)[0]


def _relaxation(target_log_prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label relaxation from log p(y) alone.

    With the projection p_r (p_r(y) = 1 - alpha, p_r(k) = alpha p(k) / (1 - p(y))
    elsewhere) the KL collapses to two terms:
        (1 - alpha) log((1 - alpha) / p(y)) + alpha log(alpha / (1 - p(y))).
    Its gradient equals that of KL(p_r || p) with p_r held constant (p_r is the
    minimiser over the credal set, so by Danskin's theorem the dependence of
    p_r on p adds nothing), which is the paper's treatment of the target.
    """
    p_y = target_log_prob.exp()
    # Clamped so that log(1 - p(y)) stays finite (and its gradient zero, not
    # NaN) inside the credal set, where torch.where discards it anyway.
    log_rest = torch.log1p(-p_y.clamp_max(1.0 - alpha))
    kl = (1.0 - alpha) * (math.log(1.0 - alpha) - target_log_prob) + alpha * (
        math.log(alpha) - log_rest
    )
    return torch.where(p_y < 1.0 - alpha, kl, torch.zeros_like(kl))


def label_relaxation_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label relaxation (Lienen & Huellermeier, AAAI 2021).

    Zero when p(y) >= 1 - alpha (the prediction lies in the credal set),
    otherwise KL(p_r || p) to the projection p_r of p onto the set.
    """
    return _relaxation(_target_log_prob(F.log_softmax(logits, -1), targets), alpha)


# --------------------------------------------------------------------------
# Second-order dispersion and semantic entropy


def dispersion_penalty(probs: torch.Tensor, ref_probs: torch.Tensor, kappa: float,
                       kind: str = "w2") -> torch.Tensor:
    """Gap between the second-order dispersion of ``probs`` and ``ref_probs``, both read
    as Dirichlets of the one evidence mass ``kappa`` (their shapes are compared, not
    their evidence: docs/method.md §3).

    ``w2``: sum_k (s_k(p) - s_k(ref))^2 with s_k = sqrt(Var_k), the scale part
    of the squared 2-Wasserstein distance between the diagonal-Gaussian
    approximations of the two Dirichlets (variances floored at VAR_FLOOR).
    ``variance``: (sum_k Var_k(p) - sum_k Var_k(ref))^2.
    """
    var, ref_var = dirichlet_variance(probs, kappa), dirichlet_variance(ref_probs, kappa)
    if kind == "w2":
        std = var.clamp_min(VAR_FLOOR).sqrt()
        ref_std = ref_var.clamp_min(VAR_FLOOR).sqrt()
        return (std - ref_std).square().sum(-1)
    if kind == "variance":
        return (var.sum(-1) - ref_var.sum(-1)).square()
    raise ValueError(f"unknown dispersion penalty {kind!r}; allowed: w2, variance")


# --------------------------------------------------------------------------
# The uncertainty-preserving loss, fused


class _UncertaintyPreserving(torch.autograd.Function):
    """CE, dispersion penalty and semantic term from one softmax, with a
    hand-written backward.

    Autograd through the composition above keeps about ten (N, V) tensors
    alive and replays as many elementwise passes in the backward. On CPU a
    fresh (N, V) tensor costs mostly page faults, and on a busy machine every
    op costs a thread synchronisation, so this allocates three (N, V) tensors'
    worth (as many as cross-entropy does: p and the reference stacked, one
    scratch), keeps the op count low and works in place: the reference becomes
    dL/dp of the penalty, the scratch dL/dp of the semantic term, and the
    backward turns them into the gradient in one softmax-Jacobian product,
        dL/dz = p * (w - <p, w>) + g_ce * (p - onehot(y)),  w = dL/dp,
    reusing their memory (so it runs once: backward with retain_graph fails
    on autograd's in-place check instead of returning a wrong gradient).
    Returns (ce, disp, se), each (N,); a term that is off comes back empty.
    """

    @staticmethod
    def forward(ctx, logits, targets, inv_temp, given_ref, smoothing, kappa, penalty, semantic,
                code_to_cluster, num_clusters):
        n, vocab = logits.shape
        rows = targets.unsqueeze(1)
        grad = ctx.needs_input_grad[0]
        tiny = torch.finfo(logits.dtype).tiny
        need_ref = penalty is not None or semantic == "match"
        # p and the reference share one (2, N, V) buffer, so that the cluster
        # sums and entropies of both are one op each.
        stacked = logits.new_empty(2, n, vocab) if need_ref else None
        probs = torch.softmax(logits, 1, out=stacked[0] if need_ref else None)
        # -log p(y) = (max z - z_y) - log max p: exact however small p(y) is,
        # without a log-softmax pass (max p >= 1/V never underflows).
        ce = (logits.amax(1) - logits.gather(1, rows).squeeze(1)) - probs.amax(1).log()

        scratch = ref = None
        if need_ref and given_ref is not None:  # teacher / empirical: computed by the caller
            ref = stacked[1].copy_(given_ref)
        elif need_ref and inv_temp is not None:  # calibrated: softmax(stopgrad(z) / T)
            scratch = logits * inv_temp
            ref = torch.softmax(scratch, 1, out=stacked[1])
        elif need_ref:  # smoothed: (1 - eps) onehot(y) + eps / V
            ref = stacked[1].fill_(smoothing / vocab)
            ref.scatter_(1, rows, 1.0 - smoothing + smoothing / vocab)

        # Semantic term; dse = its derivative in P(c) (N, C), spread to codes below.
        se = logits.new_zeros(0)
        dse = None
        if semantic == "match":
            both = cluster_probs(stacked.view(2 * n, vocab), code_to_cluster, num_clusters)
            log_both = safe_log(both)
            neg_entropy = (both * log_both).view(2, n, num_clusters).sum(2)
            gap = neg_entropy[1] - neg_entropy[0]  # SE(p) - SE(ref)
            se = gap.square()
            if grad:  # d SE / d P(c) = -(log P(c) + 1), and 0 log 0 = 0
                cluster_p, log_cluster = both[:n], log_both[:n]
                dse = (log_cluster + (cluster_p > tiny)).mul_(-2.0 * gap.unsqueeze(1))
        elif semantic == "nll":
            cluster_p = cluster_probs(probs, code_to_cluster, num_clusters)
            target_cluster = code_to_cluster[targets].unsqueeze(1)
            se = -safe_log(cluster_p.gather(1, target_cluster)).squeeze(1)
            if grad:
                p_c = cluster_p.gather(1, target_cluster)
                inv = torch.where(p_c > tiny, -1.0 / p_c, torch.zeros_like(p_c))
                dse = torch.zeros_like(cluster_p).scatter_(1, target_cluster, inv)
        elif semantic is not None:
            raise ValueError(f"unknown semantic term {semantic!r}; allowed: match, nll")

        # Dispersion penalty. With u = p (1 - p), Var = u / (kappa + 1): the
        # W2 term is shrink * sum (sqrt u - sqrt u_ref)^2, shrink = 1 / (kappa
        # + 1) kept out of the (N, V) passes. dpen = its derivative in p over
        # shrink, (N, V) in ref's memory; for "variance" the derivative is a
        # per-row multiple of p and dpen_row holds the multiplier.
        disp = logits.new_zeros(0)
        dpen = dpen_row = None
        shrink = 1.0 / (kappa + 1.0)
        if penalty == "w2":
            floor = VAR_FLOOR / shrink
            std = torch.addcmul(probs, probs, probs, value=-1.0, out=scratch)
            std.clamp_min_(floor).sqrt_()
            ref_std = torch.addcmul(ref, ref, ref, value=-1.0, out=ref).clamp_min_(floor).sqrt_()
            diff = torch.sub(std, ref_std, out=ref_std)  # sqrt u(p) - sqrt u(ref)
            disp = torch.linalg.vector_norm(diff, dim=1).square_().mul_(shrink)
            if grad:  # d/dp_k (sqrt u_k - r_k)^2 = (sqrt u_k - r_k) (1 - 2 p_k) / sqrt u_k
                # The floor has zero derivative: floored stds (exactly sqrt(floor))
                # become inf, so the division zeroes them without a mask tensor.
                floor_std = float(torch.tensor(floor, dtype=std.dtype).sqrt())
                dpen = diff.div_(F.threshold_(std, floor_std, math.inf))
                torch.addcmul(dpen, dpen, probs, value=-2.0, out=dpen)
            scratch = std
        elif penalty == "variance":
            total = shrink * (1.0 - torch.linalg.vector_norm(probs, dim=1).square())
            ref_total = shrink * (1.0 - torch.linalg.vector_norm(ref, dim=1).square())
            disp = (total - ref_total).square()
            if grad:  # d/dp_k = 2 (total - ref_total) shrink (-2 p_k)
                dpen_row = -4.0 * (total - ref_total)
            scratch = ref
        elif penalty is not None:
            raise ValueError(f"unknown dispersion penalty {penalty!r}; allowed: w2, variance")

        spread = None
        if dse is not None:  # dL_se/dp_k = dse[c(k)]
            spread = torch.index_select(dse, 1, code_to_cluster, out=scratch)
        ctx.shrink = shrink
        ctx.save_for_backward(probs, targets, dpen, dpen_row, spread)
        return ce, disp, se

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce, g_disp, g_se):
        probs, targets, dpen, dpen_row, spread = ctx.saved_tensors
        w = None  # dL/dp, built in the saved buffers
        if dpen is not None:
            w = dpen.mul_((ctx.shrink * g_disp).unsqueeze(1))
        if spread is not None:
            w = spread.mul_(g_se.unsqueeze(1)) if w is None else w.addcmul_(
                spread, g_se.unsqueeze(1))
        if dpen_row is not None:
            row = (ctx.shrink * dpen_row * g_disp).unsqueeze(1)
            w = probs * row if w is None else w.addcmul_(probs, row)
        if w is None:
            grad = probs * g_ce.unsqueeze(1)
        else:
            grad = w.mul_(probs)
            dot = grad.sum(1) - g_ce
            grad.addcmul_(probs, dot.unsqueeze(1), value=-1.0)
        grad.scatter_add_(1, targets.unsqueeze(1), -g_ce.unsqueeze(1))
        return grad, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------
# Token-loss modules: the interface of the training loop


class TokenLoss(nn.Module):
    """forward(logits (B, L, V), targets (B, L)) -> (per-token total (B, L),
    parts: dict of per-token tensors, always with the plain CE under "ce").
    Parts are detached: they are for logging, and a logged part that kept its
    graph would keep every step's activations alive.

    Losses compute in float32 (float64 stays float64) with autocast off: a
    log-softmax over V in bf16 loses the small probabilities these losses
    are about.
    """

    needs_calibration = False  # True: the loop refits self.temperatures
    needs_reference = False  # True: forward takes reference=p_ref (B, L, V)

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each added part in the total (total = ce + sum weight * part):
        what the training curve logs as each term's dose. Empty for a plain CE."""
        return {}

    @staticmethod
    def _upcast(logits: torch.Tensor) -> torch.Tensor:
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


class CrossEntropy(TokenLoss):
    def forward(self, logits, targets):
        with torch.autocast(logits.device.type, enabled=False):
            ce = cross_entropy_loss(self._upcast(logits), targets)
        return ce, {"ce": ce.detach()}


class LabelSmoothing(TokenLoss):
    def __init__(self, epsilon: float):
        super().__init__()
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon={epsilon} must lie in (0, 1)")
        self.epsilon = epsilon

    def forward(self, logits, targets):
        with torch.autocast(logits.device.type, enabled=False):
            total, ce = _smoothing(F.log_softmax(self._upcast(logits), -1), targets, self.epsilon)
        return total, {"ce": ce.detach()}


class LabelRelaxation(TokenLoss):
    def __init__(self, alpha: float):
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha={alpha} must lie in (0, 1)")
        self.alpha = alpha

    def forward(self, logits, targets):
        with torch.autocast(logits.device.type, enabled=False):
            log_p_y = _target_log_prob(F.log_softmax(self._upcast(logits), -1), targets)
        return _relaxation(log_p_y, self.alpha), {"ce": -log_p_y.detach()}


REFERENCES = ("calibrated", "smoothed", "teacher", "empirical")


class UncertaintyPreservingLoss(TokenLoss):
    """CE + lambda_disp * dispersion penalty + lambda_se * semantic term (docs/method.md §3).

    The reference p_ref:
    ``"calibrated"``: softmax(stopgrad(z) / T_s), T_s the temperature of the
    position's scale, held in the ``temperatures`` buffer (1 at start, so both
    terms start at 0) and refitted by the caller with
    :class:`TemperatureCalibrator`. ``"smoothed"``: (1 - smoothing) onehot(y)
    + smoothing / V. ``"teacher"`` and ``"empirical"`` do not move with the
    model: the caller computes p_ref (a frozen teacher's tempered softmax;
    Dirichlet-smoothed counts given a context) and passes it to forward as
    ``reference=p_ref``. Model and reference are always compared at the one
    evidence ``kappa``: the empirical counts' own evidence kappa_ref(c) = n(c)
    + a_0, in the hundreds, would shrink the W2 term by 1 / (kappa_ref + 1)
    and switch it off; the counts act through p_ref (a rare context is close
    to the uniform prior, a wide reference). ``semantic="match"`` penalises
    (SE(p) - SE(p_ref))^2, ``"nll"`` is -log P(c(y)). A term whose lambda is
    0 is neither computed nor reported.

    Parts: "ce", "disp", "se" (per token; the total is
    ce + lambda_disp * disp + lambda_se * se). The options have no defaults
    here: params.yaml (through ``UPParams``, below) is their one source.
    """

    def __init__(self, *, kappa: float, lambda_disp: float, lambda_se: float, penalty: str,
                 reference: str, smoothing: float, semantic: str,
                 code_to_cluster: torch.Tensor | None = None,
                 num_clusters: int | None = None, scale_ids: torch.Tensor | None = None,
                 num_scales: int | None = None, fused: bool = True):
        super().__init__()
        self.fused = fused
        if kappa <= 0:
            raise ValueError(f"kappa={kappa} must be > 0")
        if lambda_disp < 0 or lambda_se < 0:
            raise ValueError(f"lambda_disp={lambda_disp} and lambda_se={lambda_se} must be >= 0")
        if penalty not in ("w2", "variance"):
            raise ValueError(f"unknown penalty {penalty!r}; allowed: w2, variance")
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; allowed: {', '.join(REFERENCES)}")
        if semantic not in ("match", "nll"):
            raise ValueError(f"unknown semantic term {semantic!r}; allowed: match, nll")
        if reference == "smoothed" and not 0.0 < smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing} must lie in (0, 1)")
        self.kappa, self.lambda_disp, self.lambda_se = kappa, lambda_disp, lambda_se
        self.penalty = penalty if lambda_disp > 0 else None
        self.semantic = semantic if lambda_se > 0 else None
        self.reference, self.smoothing = reference, smoothing
        self.needs_calibration = reference == "calibrated"
        self.needs_reference = reference in ("teacher", "empirical")

        if self.semantic is not None:
            if code_to_cluster is None or num_clusters is None:
                raise ValueError("lambda_se > 0 needs code_to_cluster and num_clusters")
            if code_to_cluster.dim() != 1 or int(code_to_cluster.max()) >= num_clusters:
                raise ValueError("code_to_cluster must be (V,) with values < num_clusters")
            self.register_buffer("code_to_cluster", code_to_cluster.long().clone(),
                                 persistent=False)
        else:
            self.code_to_cluster = None
        self.num_clusters = num_clusters
        if self.needs_calibration:
            if scale_ids is None or num_scales is None:
                raise ValueError("reference='calibrated' needs scale_ids and num_scales")
            self.register_buffer("scale_ids", scale_ids.long().clone(), persistent=False)
            self.register_buffer("temperatures", torch.ones(num_scales))

    @property
    def weights(self) -> dict[str, float]:
        weights = {}
        if self.penalty is not None:
            weights["disp"] = self.lambda_disp
        if self.semantic is not None:
            weights["se"] = self.lambda_se
        return weights

    def forward(self, logits, targets, reference: torch.Tensor | None = None):
        batch_shape = targets.shape
        if self.needs_reference != (reference is not None):
            raise ValueError(f"reference={self.reference!r} "
                             + ("needs" if self.needs_reference else "takes no")
                             + " reference=p_ref in forward")
        with torch.autocast(logits.device.type, enabled=False):
            flat = self._upcast(logits).reshape(-1, logits.shape[-1])
            inv_temp = given = None
            if self.needs_calibration:
                if logits.shape[-2] != self.scale_ids.numel():
                    raise ValueError(f"logits have {logits.shape[-2]} positions, scale_ids "
                                     f"{self.scale_ids.numel()}")
                per_pos = temperature.inverse(self.temperatures, self.scale_ids, flat.dtype).squeeze(-1)
                inv_temp = per_pos.expand(batch_shape).reshape(-1, 1)
            if reference is not None:
                given = reference.reshape(flat.shape).to(flat.dtype)
            run = _UncertaintyPreserving.apply if self.fused else self._plain
            ce, disp, se = run(flat, targets.reshape(-1), inv_temp, given, self.smoothing, self.kappa,
                               self.penalty, self.semantic, self.code_to_cluster,
                               self.num_clusters)
        total, parts = ce, {"ce": ce}
        if self.penalty is not None:
            total, parts["disp"] = total + self.lambda_disp * disp, disp
        if self.semantic is not None:
            total, parts["se"] = total + self.lambda_se * se, se
        return total.view(batch_shape), {k: v.detach().view(batch_shape) for k, v in parts.items()}


    @staticmethod
    def _plain(logits, targets, inv_temp, given, smoothing, kappa, penalty, semantic,
               code_to_cluster, num_clusters):
        """The same (ce, disp, se) as the fused function, written with the public
        functions above and differentiated by autograd: the readable definition
        (``fused: false``), and what the fused kernel is tested against."""
        probs = logits.softmax(-1)
        if given is not None:
            ref = given
        elif inv_temp is not None:
            ref = (logits.detach() * inv_temp).softmax(-1)
        else:
            vocab = logits.shape[-1]
            ref = (1 - smoothing) * F.one_hot(targets, vocab).to(logits.dtype) + smoothing / vocab
        ce = cross_entropy_loss(logits, targets)
        disp = dispersion_penalty(probs, ref, kappa, penalty) if penalty else ce.new_zeros(0)
        if semantic == "match":
            se = (semantic_entropy(probs, code_to_cluster, num_clusters)
                  - semantic_entropy(ref, code_to_cluster, num_clusters)).square()
        elif semantic == "nll":
            cluster_p = cluster_probs(probs, code_to_cluster, num_clusters)
            se = -safe_log(cluster_p.gather(-1, code_to_cluster[targets].unsqueeze(-1))
                                 ).squeeze(-1)
        else:
            se = ce.new_zeros(0)
        return ce, disp, se


class KnowledgeDistillation(TokenLoss):
    """CE + lambda_kd * KL(p_T || softmax(z)) per token (Hinton et al. 2015;
    docs/method.md §3): the control of `up` with ``reference: teacher``. p_T is the
    same frozen, temperature-scaled teacher's prediction, passed to forward as
    ``reference=p_T``; if a teacher-referenced `up` only pulls the student towards
    p_T, it does no better than this at this loss's own best weight.

    One log-softmax gives both terms; dKL/dz = softmax(z) - p_T. Parts: "ce", "kd"
    (the KL, also logged at lambda_kd = 0).
    """

    needs_reference = True

    def __init__(self, *, lambda_kd: float):
        super().__init__()
        if lambda_kd < 0:
            raise ValueError(f"lambda_kd={lambda_kd} must be >= 0")
        self.lambda_kd = lambda_kd

    @property
    def weights(self) -> dict[str, float]:
        return {"kd": self.lambda_kd}

    def forward(self, logits, targets, reference: torch.Tensor | None = None):
        if reference is None:
            raise ValueError("loss 'kd' needs reference=p_teacher in forward")
        with torch.autocast(logits.device.type, enabled=False):
            log_probs = F.log_softmax(self._upcast(logits), -1)
            teacher = reference.to(log_probs.dtype)
            ce = -_target_log_prob(log_probs, targets)
            # sum p_T log p_T - sum p_T log p, with 0 log 0 = 0
            kl = (torch.xlogy(teacher, teacher) - teacher * log_probs).sum(-1)
        return ce + self.lambda_kd * kl, {"ce": ce.detach(), "kd": kl.detach()}


# --------------------------------------------------------------------------
# The registry: what params.yaml, the training step and the DVC stage graph know of a loss


class LossParams(Section):
    """A variant's section of params.yaml, as its loss declares it: ``loss`` is the
    declaration's name (a ``Literal``), the other fields are the loss's settings with
    their ranges. up/core/params.py keeps variants untyped (the params know no loss);
    :func:`check_variants` types them with these models."""

    loss: str


Context = Literal["clusters", "scales"]


def _no_reference(params: LossParams) -> str | None:
    return None


def _needs_no_teacher(params: LossParams) -> bool:
    return False


@dataclass(frozen=True)
class LossDeclaration:
    """Everything the pipeline knows of one loss, so that adding a loss is one
    declaration here: the params union, ``LOSSES``, the training step's context and
    references and the variants/derived placement are all read from these.

    ``module``: the TokenLoss it trains; None for a variant that trains nothing (ts:
    fitted post hoc on the teacher, see up/training/run.py). ``context``: what the
    module takes besides its settings: "clusters" (code_to_cluster, num_clusters of
    the tokenizer's codebook), "scales" (scale_ids, num_scales of the positions).
    ``loop_keys``: settings the training loop reads, not the module (up: calib_every).
    ``reference``: the per-batch :class:`up.training.references.Reference` these
    settings need ("teacher" | "empirical"), or None. ``needs_teacher``: whether they
    need the teacher model, i.e. belong under `derived` (DVC orders those after it).
    """

    name: str
    params: type[LossParams]
    module: type[TokenLoss] | None
    context: tuple[Context, ...] = ()
    loop_keys: tuple[str, ...] = ()
    reference: Callable[[Any], str | None] = _no_reference
    needs_teacher: Callable[[Any], bool] = _needs_no_teacher

    def options(self, params: LossParams) -> dict[str, Any]:
        """The module's keyword arguments: the settings less `loss` and the loop's."""
        return params.model_dump(exclude={"loss", *self.loop_keys})


DECLARATIONS: dict[str, LossDeclaration] = {}


def declare(declaration: LossDeclaration) -> LossDeclaration:
    """Register a loss under its name, which its params model must carry as its tag."""
    tag = get_args(declaration.params.model_fields["loss"].annotation)
    if tag != (declaration.name,):
        raise ValueError(f"{declaration.params.__name__}.loss must be Literal[{declaration.name!r}]")
    if declaration.name in DECLARATIONS:
        raise ValueError(f"loss {declaration.name!r} is declared twice")
    DECLARATIONS[declaration.name] = declaration
    return declaration


class _Modules(Mapping[str, type[TokenLoss]]):
    """``LOSSES``: name -> TokenLoss of every declared loss that trains a module, read
    from DECLARATIONS at each use (so a loss declared later is in it too)."""

    def __getitem__(self, name: str) -> type[TokenLoss]:
        module = DECLARATIONS[name].module
        if module is None:
            raise KeyError(name)
        return module

    def __iter__(self) -> Iterator[str]:
        return (name for name, d in DECLARATIONS.items() if d.module is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


LOSSES: Mapping[str, type[TokenLoss]] = _Modules()


def declaration(kind: str) -> LossDeclaration:
    """The declaration of loss ``kind``: what callers ask instead of testing the name."""
    if kind not in DECLARATIONS:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(DECLARATIONS)}")
    return DECLARATIONS[kind]


@functools.cache
def _union_of(models: tuple[type[LossParams], ...]) -> TypeAdapter:
    return TypeAdapter(Annotated[Union[models], Field(discriminator="loss")])  # noqa: UP007


def variant_union() -> TypeAdapter:
    """The params of any declared loss, told apart by their `loss` tag."""
    return _union_of(tuple(d.params for d in DECLARATIONS.values()))


def _error_lines(exc: ValidationError, group: str, name: str) -> list[str]:
    lines = []
    for err in exc.errors():
        loc, given = list(err["loc"]), err.get("input")
        if loc and loc[0] in DECLARATIONS:
            del loc[0]  # pydantic repeats the discriminator tag; users never wrote it
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc, given = ["loss"], given.get("loss") if isinstance(given, dict) else given
        lines.append(describe_error({**err, "loc": (group, name, *loc), "input": given}))
    return lines


def _placement(group: str, name: str, spec: LossParams) -> str | None:
    teacher = declaration(spec.loss).needs_teacher(spec)
    if group == "variants" and teacher:
        return f"{PARAMS_FILE}: variants.{name} needs the teacher model: declare it under `derived`"
    if group == "derived" and not teacher:
        return (f"{PARAMS_FILE}: derived.{name} does not need the teacher model (only those "
                "that do belong here): declare it under `variants`")
    return None


def check_variants(params: Params) -> dict[str, LossParams]:
    """Every variant (trained, derived, then post hoc) typed by its loss's declaration.

    Raises ParamsError with one line per bad key (the format of load_params) and per
    variant declared in the wrong group: `derived` holds exactly those that need the
    teacher model, so that DVC trains the teacher first."""
    typed: dict[str, LossParams] = {}
    lines: list[str] = []
    for group in ("variants", "derived", "post_hoc_runs"):
        for name, section in getattr(params, group).items():
            try:
                spec = variant_union().validate_python(section.model_dump())
            except ValidationError as exc:
                lines += _error_lines(exc, group, name)
                continue
            if (problem := _placement(group, name, spec)) is not None:
                lines.append(problem)
            typed[name] = spec
    if lines:
        raise ParamsError(lines)
    return typed


def variant_params(params: Params, name: str) -> LossParams:
    """The typed settings of variant ``name``, after checking every variant (a bad
    one stops any run before its work)."""
    params.variant(name)  # ParamsError when not declared
    return check_variants(params)[name]


def build_token_loss(kind: str, *, code_to_cluster: torch.Tensor | None = None,
                     num_clusters: int | None = None, scale_ids: torch.Tensor | None = None,
                     num_scales: int | None = None, **options) -> TokenLoss:
    """The token loss ``kind`` (a key of LOSSES) with ``options`` its settings
    (epsilon; alpha; kappa, lambda_disp, ...). The tokenizer/model context is accepted
    for every kind, so one call serves all variants; each module gets the part its
    declaration asks for."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}")
    declared = DECLARATIONS[kind]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    context = {"clusters": {"code_to_cluster": code_to_cluster, "num_clusters": num_clusters},
               "scales": {"scale_ids": scale_ids, "num_scales": num_scales}}
    given = {key for need in context.values() for key in need}
    allowed = [name for name, param in inspect.signature(declared.module.__init__).parameters.items()
               if param.kind in named and name != "self" and name not in given]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"loss {kind!r} got unknown options {unknown}; allowed: {allowed}")
    for need in declared.context:
        options.update(context[need])
    return declared.module(**options)


def variant_loss(spec: LossParams, **context: Any) -> TokenLoss:
    """The token loss of a variant's typed settings (``context`` as for build_token_loss)."""
    return build_token_loss(spec.loss, **context, **declaration(spec.loss).options(spec))


# --------------------------------------------------------------------------
# The declared losses: their params.yaml sections (defaults fill what a variant omits)


class CEParams(LossParams):
    loss: Literal["ce"]


class LSParams(LossParams):
    loss: Literal["ls"]
    epsilon: float = Field(0.1, gt=0, lt=1)


class LRParams(LossParams):
    loss: Literal["lr"]
    alpha: float = Field(0.1, gt=0, lt=1)


class UPParams(LossParams):
    loss: Literal["up"]
    kappa: float = Field(1.0, gt=0)
    lambda_disp: float = Field(0.5, ge=0)
    lambda_se: float = Field(0.1, ge=0)
    penalty: Literal["w2", "variance"] = "w2"
    reference: Literal["calibrated", "smoothed", "teacher", "empirical"] = "calibrated"
    smoothing: float = Field(0.1, gt=0, lt=1)
    semantic: Literal["match", "nll"] = "match"
    calib_every: int = Field(50, ge=1)
    fused: bool = True  # the fused kernel; false: the plain composition (same values)


class KDParams(LossParams):
    """Distillation control of the study (no variant in the default run, so no default:
    a study profile spells its weight)."""

    loss: Literal["kd"]
    lambda_kd: float = Field(ge=0)


class TSParams(LossParams):
    """Post-hoc temperature scaling of a base model (the teacher under `derived`, the
    listed run for `post_hoc`): no training. Its probabilities, ECE, NLL and sampled
    uncertainty scores come from the fitted temperatures; ``sample_at_temperatures``
    false (a calibrator, `ce+ts`) keeps the base model's samples, true (`ce+ts-sampler`)
    also draws the tokens at the fitted temperatures."""

    loss: Literal["ts"]
    sample_at_temperatures: bool = False


declare(LossDeclaration("ce", CEParams, CrossEntropy))
declare(LossDeclaration("ls", LSParams, LabelSmoothing))
declare(LossDeclaration("lr", LRParams, LabelRelaxation))
declare(LossDeclaration(
    "up", UPParams, UncertaintyPreservingLoss, context=("clusters", "scales"),
    loop_keys=("calib_every",),
    reference=lambda p: p.reference if p.reference in ("teacher", "empirical") else None,
    needs_teacher=lambda p: p.reference == "teacher"))
declare(LossDeclaration("kd", KDParams, KnowledgeDistillation, reference=lambda p: "teacher",
                        needs_teacher=lambda p: True))
declare(LossDeclaration("ts", TSParams, None, needs_teacher=lambda p: True))
