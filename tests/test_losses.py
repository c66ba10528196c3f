"""Token losses and temperature scaling against hand-computed values (float64)."""

import math
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from tests.project import params_from_yaml
from up.core.params import ParamsError
from up.models.temperature import TemperatureCalibrator, fit_temperature
from up.models.uncertainty import cluster_probs, dirichlet_variance, semantic_entropy
from up.training import losses
from up.training.losses import (
    DECLARATIONS,
    LOSSES,
    VAR_FLOOR,
    LossDeclaration,
    LossParams,
    TokenLoss,
    UncertaintyPreservingLoss,
    _UncertaintyPreserving,
    build_token_loss,
    check_variants,
    cross_entropy_loss,
    dispersion_penalty,
    label_relaxation_loss,
    label_smoothing_loss,
    variant_loss,
    variant_params,
    variant_union,
)

D = torch.float64
# The `up` options without the semantic term (no clusters needed).
UP_OPTIONS = dict(kappa=1.0, lambda_disp=0.5, lambda_se=0.0, penalty="w2", reference="calibrated",
                  smoothing=0.1, semantic="match")


def t(*values):
    return torch.tensor(values, dtype=D)


# -- baselines -------------------------------------------------------------

P3 = t(0.5, 0.3, 0.2)


def test_cross_entropy_and_label_smoothing_by_hand():
    logits, y = P3.log().expand(2, 3), torch.tensor([0, 2])
    assert torch.allclose(cross_entropy_loss(logits, y), t(math.log(2), -math.log(0.2)))
    mean_nll = -(math.log(0.5) + math.log(0.3) + math.log(0.2)) / 3
    expected = t(0.9 * math.log(2) + 0.1 * mean_nll, -0.9 * math.log(0.2) + 0.1 * mean_nll)
    assert torch.allclose(label_smoothing_loss(logits, y, 0.1), expected)
    assert torch.allclose(label_smoothing_loss(logits, y, 0.1),
                          F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none"))


def test_label_relaxation_is_kl_to_projection_outside_credal_set():
    alpha, y = 0.1, torch.tensor([0])
    logits = P3.log().unsqueeze(0).requires_grad_()
    projection = t(0.9, 0.1 * 0.3 / 0.5, 0.1 * 0.2 / 0.5)  # p_r(k) = alpha p_k / (1 - p_y)
    kl = (projection * (projection / P3).log()).sum()
    assert math.isclose(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), float(kl))
    loss = label_relaxation_loss(logits, y, alpha)
    assert torch.allclose(loss, kl.unsqueeze(0))
    # The projection is a constant target: gradient = p - p_r.
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.allclose(grad[0], P3 - projection)


def test_label_relaxation_is_zero_inside_credal_set():
    logits = t(0.95, 0.03, 0.02).log().unsqueeze(0).requires_grad_()
    loss = label_relaxation_loss(logits, torch.tensor([0]), 0.1)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert float(loss.detach()) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    # p(y) = 1 exactly (saturated logits): still 0 with a finite gradient.
    saturated = t(0.0, -800.0, -800.0).unsqueeze(0).requires_grad_()
    loss = label_relaxation_loss(saturated, torch.tensor([0]), 0.1)
    (grad,) = torch.autograd.grad(loss.sum(), saturated)
    assert float(loss.detach()) == 0.0 and torch.isfinite(grad).all()


# -- second-order dispersion -----------------------------------------------


def test_dirichlet_variance_by_hand():
    assert torch.allclose(dirichlet_variance(P3, 1.0), t(0.125, 0.105, 0.08))
    assert torch.allclose(dirichlet_variance(P3, 4.0), t(0.25, 0.21, 0.16) / 5)


def test_w2_penalty_by_hand():
    # Swapped vectors: stds sqrt(1/8) and sqrt(2/25) differ by sqrt(2)/20 twice.
    assert math.isclose(float(dispersion_penalty(P3, P3.flip(0), 1.0, "w2")), 2 * 2 / 400)
    # A zero probability: its variance is floored before the square root.
    p, ref = t(0.5, 0.5, 0.0), t(1 / 3, 1 / 3, 1 / 3)
    expected = 2 * (math.sqrt(1 / 8) - 1 / 3) ** 2 + (math.sqrt(VAR_FLOOR) - 1 / 3) ** 2
    assert math.isclose(float(dispersion_penalty(p, ref, 1.0, "w2")), expected)
    # kappa shrinks every variance by 1 / (kappa + 1), so the W2 term as well.
    assert math.isclose(float(dispersion_penalty(P3, P3.flip(0), 3.0, "w2")), 2 * 2 / 400 / 2)


def test_variance_penalty_by_hand():
    p, ref = t(0.5, 0.5, 0.0), t(1 / 3, 1 / 3, 1 / 3)
    # total variances 0.5 / 2 and (2/3) / 2
    assert math.isclose(float(dispersion_penalty(p, ref, 1.0, "variance")), (0.25 - 1 / 3) ** 2)
    assert math.isclose(float(dispersion_penalty(p, ref, 2.0, "variance")),
                        ((0.5 - 2 / 3) / 3) ** 2)
    assert float(dispersion_penalty(P3, P3.flip(0), 1.0, "variance")) == 0.0


@pytest.mark.parametrize("kind", ["w2", "variance"])
def test_penalty_zero_when_reference_equals_prediction(kind):
    probs = torch.softmax(torch.randn(4, 7, dtype=D) * 3, -1)
    assert torch.equal(dispersion_penalty(probs, probs, 1.0, kind), torch.zeros(4, dtype=D))


def _total_variance(logits):
    return float(dirichlet_variance(torch.softmax(logits, -1), 1.0).sum())


@pytest.mark.parametrize("kind", ["w2", "variance"])
@pytest.mark.parametrize("seed", range(5))
def test_penalty_gradient_restores_reference_dispersion(kind, seed):
    """A gradient step raises the dispersion of a prediction sharper than the
    reference (reference = softmax(z / 2)) and lowers it when flatter (z * 2)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(20, generator=gen, dtype=D) * 2
    for temperature, direction in ((2.0, 1), (0.5, -1)):
        ref = torch.softmax(logits / temperature, -1)
        z = logits.clone().requires_grad_()
        penalty = dispersion_penalty(torch.softmax(z, -1), ref, 1.0, kind)
        (grad,) = torch.autograd.grad(penalty, z)
        assert float(penalty.detach()) > 0
        change = _total_variance(logits - 1e-2 * grad) - _total_variance(logits)
        assert change * direction > 0


@pytest.mark.parametrize("kind", ["w2", "variance"])
def test_penalty_gradcheck(kind):
    logits = torch.randn(3, 6, dtype=D, requires_grad=True)
    ref = torch.softmax(torch.randn(3, 6, dtype=D), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, r: dispersion_penalty(torch.softmax(z, -1), r, 1.5, kind), (logits, ref))


# -- semantic entropy ------------------------------------------------------


def test_semantic_entropy_with_identity_clusters_is_entropy():
    probs = torch.softmax(torch.randn(5, 8, dtype=D), -1)
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(semantic_entropy(probs, torch.arange(8), 8), entropy)


def test_semantic_entropy_zero_when_one_cluster_holds_all_mass():
    code_to_cluster = torch.tensor([0, 1, 1, 0, 2, 1])
    probs = t(0.0, 0.2, 0.5, 0.0, 0.0, 0.3)  # all on cluster 1, some codes exactly 0
    assert float(semantic_entropy(probs, code_to_cluster, 3)) == 0.0
    spread = torch.softmax(torch.randn(6, dtype=D), -1)
    assert float(semantic_entropy(spread, torch.zeros(6, dtype=torch.long), 1)) == 0.0


def test_semantic_entropy_by_hand_and_invariant_within_cluster():
    code_to_cluster = torch.tensor([0, 1, 1, 0, 2, 1])
    probs = t(0.1, 0.2, 0.05, 0.15, 0.4, 0.1)  # P(c) = 0.25, 0.35, 0.4
    expected = -sum(q * math.log(q) for q in (0.25, 0.35, 0.4))
    assert torch.allclose(cluster_probs(probs, code_to_cluster, 3), t(0.25, 0.35, 0.4))
    assert math.isclose(float(semantic_entropy(probs, code_to_cluster, 3)), expected)
    permuted = probs[torch.tensor([3, 5, 1, 0, 4, 2])]  # codes swapped inside clusters
    assert math.isclose(float(semantic_entropy(permuted, code_to_cluster, 3)), expected)


def test_semantic_entropy_gradcheck_and_finite_gradient_at_empty_cluster():
    code_to_cluster = torch.tensor([0, 1, 1, 0, 2, 1, 2])
    logits = torch.randn(4, 7, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: semantic_entropy(torch.softmax(z, -1), code_to_cluster, 3), (logits,))
    probs = t(0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0).requires_grad_()  # cluster 2 empty
    (grad,) = torch.autograd.grad(semantic_entropy(probs, code_to_cluster, 3), probs)
    assert torch.isfinite(grad).all()


# -- the uncertainty-preserving loss ---------------------------------------

V, C, SCALES = 11, 4, torch.tensor([0, 1, 1, 1, 1])
CLUSTERS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1])


def _up(**options):
    defaults = dict(kappa=2.0, lambda_disp=0.7, lambda_se=0.3, penalty="w2",
                    reference="calibrated", smoothing=0.1, semantic="match",
                    code_to_cluster=CLUSTERS, num_clusters=C, scale_ids=SCALES, num_scales=2)
    return UncertaintyPreservingLoss(**{**defaults, **options})


def _reference_composition(loss, logits, targets):
    """The loss written with the public functions, for autograd to differentiate."""
    probs = torch.softmax(logits, -1)
    if loss.reference == "calibrated":
        temps = loss.temperatures.to(logits.dtype)[loss.scale_ids].unsqueeze(-1)
        ref = torch.softmax(logits.detach() / temps, -1)
    else:
        eps = loss.smoothing
        ref = (1 - eps) * F.one_hot(targets, logits.shape[-1]).to(logits.dtype) + eps / V
    parts = {"ce": cross_entropy_loss(logits, targets),
             "disp": dispersion_penalty(probs, ref, loss.kappa, loss.penalty)}
    if loss.semantic == "match":
        parts["se"] = (semantic_entropy(probs, CLUSTERS, C) - semantic_entropy(ref, CLUSTERS, C)
                       ).square()
    else:
        p_c = cluster_probs(probs, CLUSTERS, C).gather(-1, CLUSTERS[targets].unsqueeze(-1))
        parts["se"] = -p_c.squeeze(-1).log()
    return parts


@pytest.mark.parametrize("penalty", ["w2", "variance"])
@pytest.mark.parametrize("reference", ["calibrated", "smoothed"])
@pytest.mark.parametrize("semantic", ["match", "nll"])
def test_fused_loss_matches_composition_of_public_functions(penalty, reference, semantic):
    loss = _up(penalty=penalty, reference=reference, semantic=semantic)
    if reference == "calibrated":
        loss.temperatures.copy_(torch.tensor([1.5, 0.7]))
    logits = (torch.randn(3, 5, V, dtype=D) * 2).requires_grad_()
    targets = torch.randint(0, V, (3, 5))
    total, parts = loss(logits, targets)
    expected = _reference_composition(loss, logits, targets)
    plain = _up(penalty=penalty, reference=reference, semantic=semantic, fused=False)
    plain.load_state_dict(loss.state_dict())
    plain_total, plain_parts = plain(logits, targets)
    for name in parts:  # the fused kernel equals the module's own plain composition
        assert torch.allclose(parts[name], plain_parts[name], atol=1e-12), name
    (g_fused,) = torch.autograd.grad(loss(logits, targets)[0].sum(), logits)  # a fresh graph
    (g_plain,) = torch.autograd.grad(plain_total.sum(), logits)
    assert torch.allclose(g_fused, g_plain, atol=1e-12)
    assert set(parts) == {"ce", "disp", "se"}
    for name in parts:
        assert not parts[name].requires_grad
        assert torch.allclose(parts[name], expected[name], atol=1e-12), name
    want = expected["ce"] + 0.7 * expected["disp"] + 0.3 * expected["se"]
    assert torch.allclose(total, want, atol=1e-12)
    weights = torch.rand(3, 5, dtype=D)  # any token weighting
    (g_got,) = torch.autograd.grad((total * weights).sum(), logits)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits, retain_graph=True)
    assert torch.allclose(g_got, g_want, atol=1e-12)
    # The fused function on its own: each output with its own upstream gradient.
    inv_temp = None
    if reference == "calibrated":
        inv_temp = (1 / loss.temperatures.to(D))[SCALES].expand(3, 5).reshape(-1, 1)
    outputs = _UncertaintyPreserving.apply(
        logits.reshape(-1, V), targets.reshape(-1), inv_temp, None, loss.smoothing, loss.kappa,
        penalty, semantic, CLUSTERS, C)
    upstream = torch.randn(3, 15, dtype=D)
    got = sum((out * g).sum() for out, g in zip(outputs, upstream, strict=True))
    want = sum((expected[k].reshape(-1) * g).sum()
               for k, g in zip(("ce", "disp", "se"), upstream, strict=True))
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g_got, g_want, atol=1e-12)


def test_calibrated_terms_start_at_zero():
    """T = 1: the reference is the prediction itself, both extra terms vanish."""
    logits = torch.randn(2, 5, V) * 3
    total, parts = _up()(logits, torch.randint(0, V, (2, 5)))
    assert torch.equal(parts["disp"], torch.zeros(2, 5))
    assert torch.equal(parts["se"], torch.zeros(2, 5))
    assert torch.equal(total, parts["ce"])


def test_loss_is_finite_on_saturated_and_low_precision_logits():
    loss = _up()
    loss.temperatures.fill_(1.7)
    logits = torch.randn(2, 5, V) * 3
    logits[0, 0, 3] = 200.0  # p = 1 in float32: variances floored, clusters empty
    logits = logits.to(torch.bfloat16).requires_grad_()
    total, parts = loss(logits, torch.randint(0, V, (2, 5)))
    total.sum().backward()
    assert total.dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in parts.values())
    assert torch.isfinite(logits.grad.float()).all()


def test_backward_runs_once():
    """The backward reuses the saved buffers; a second pass must fail loudly."""
    loss = _up()
    loss.temperatures.fill_(1.3)
    logits = torch.randn(1, 5, V, requires_grad=True)
    total, _ = loss(logits, torch.randint(0, V, (1, 5)))
    total.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        total.sum().backward()


def test_disabled_terms_are_skipped():
    total, parts = _up(lambda_se=0.0, code_to_cluster=None)(torch.randn(2, 5, V),
                                                             torch.randint(0, V, (2, 5)))
    assert set(parts) == {"ce", "disp"}
    total, parts = _up(lambda_disp=0.0, semantic="nll", reference="smoothed")(
        torch.randn(2, 5, V), torch.randint(0, V, (2, 5)))
    assert set(parts) == {"ce", "se"}


def test_up_loss_lowers_its_total_when_optimised():
    torch.manual_seed(1)
    loss = _up(reference="smoothed")
    logits = torch.zeros(4, 5, V)
    targets = torch.randint(0, V, (4, 5))
    first = float(loss(logits, targets)[0].mean())
    for _ in range(30):
        z = logits.requires_grad_()
        (grad,) = torch.autograd.grad(loss(z, targets)[0].mean(), z)
        logits = (z - 5.0 * grad).detach()
    assert float(loss(logits, targets)[0].mean()) < 0.5 * first


# -- the factory -----------------------------------------------------------


def test_build_token_loss_kinds_and_parts():
    logits, targets = torch.randn(2, 5, V, dtype=D), torch.randint(0, V, (2, 5))
    ce = cross_entropy_loss(logits, targets)
    context = dict(code_to_cluster=CLUSTERS, num_clusters=C, scale_ids=SCALES, num_scales=2)
    expected = {"ce": ce, "ls": label_smoothing_loss(logits, targets, 0.2),
                "lr": label_relaxation_loss(logits, targets, 0.3), "up": ce}
    options = {"ce": {}, "ls": {"epsilon": 0.2}, "lr": {"alpha": 0.3}, "up": {**UP_OPTIONS, "kappa": 3.0}}
    for kind in expected:
        module = build_token_loss(kind, **context, **options[kind])
        total, parts = module(logits, targets)
        assert total.shape == (2, 5)
        assert torch.allclose(parts["ce"], ce)
        assert torch.allclose(total, expected[kind])  # up at T = 1: CE alone
        assert module.needs_calibration == (kind == "up")


def test_build_token_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match="allowed: ce, ls, lr, up, kd"):
        build_token_loss("focal")
    with pytest.raises(ValueError, match="unknown options \\['alpha'\\]"):
        build_token_loss("ls", alpha=0.1)
    with pytest.raises(ValueError, match="unknown options \\['epsilon'\\]; allowed: \\[\\]"):
        build_token_loss("ce", epsilon=0.1)
    with pytest.raises(ValueError, match="scale_ids"):
        build_token_loss("up", code_to_cluster=CLUSTERS, num_clusters=C, **UP_OPTIONS)


# -- the registry: every list of losses is read from the declarations --------


class _Toy(TokenLoss):
    """A loss only these tests declare: CE times gamma, and the scales it was given."""

    def __init__(self, gamma: float, scale_ids=None, num_scales=None):
        super().__init__()
        self.gamma, self.num_scales = gamma, num_scales

    def forward(self, logits, targets):
        ce = cross_entropy_loss(logits, targets)
        return self.gamma * ce, {"ce": ce.detach()}


class _ToyParams(LossParams):
    loss: Literal["toy"]
    gamma: float = Field(1.0, gt=0)
    every: int = Field(5, ge=1)  # read by the loop, not the module


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """`toy` declared in a copy of the registry (gone after the test); Params built in
    an empty folder, from the given sections alone."""
    monkeypatch.setattr(losses, "DECLARATIONS", dict(losses.DECLARATIONS))
    monkeypatch.chdir(tmp_path)
    return losses.declare(LossDeclaration("toy", _ToyParams, _Toy, context=("scales",),
                                          loop_keys=("every",),
                                          needs_teacher=lambda p: p.gamma > 10))


def _params(variants: dict, derived: dict | None = None):
    return params_from_yaml(variants=variants, derived=derived or {}, teacher=next(iter(variants)))


def test_each_declared_loss_has_its_tag_params_model_and_module():
    assert list(LOSSES) == ["ce", "ls", "lr", "up", "kd"]  # ts trains nothing
    for name, declared in DECLARATIONS.items():
        assert issubclass(declared.params, LossParams) and declared.name == name
        required = {f: 1.0 for f, info in declared.params.model_fields.items()
                    if info.is_required() and f != "loss"}  # kd's weight has no default
        assert type(variant_union().validate_python({"loss": name, **required})) is declared.params
        assert (declared.module is None) == (name == "ts")
        if declared.module is not None:
            assert LOSSES[name] is declared.module and issubclass(declared.module, TokenLoss)


def test_a_declaration_is_all_a_new_loss_needs(toy):
    """LOSSES, the params union, the typed variants, the module's context and the
    training step's options all follow from the one declaration."""
    assert "toy" in LOSSES and LOSSES["toy"] is _Toy
    spec = variant_params(_params({"ce": {"loss": "ce"}, "t": {"loss": "toy", "gamma": 3}}), "t")
    assert spec == _ToyParams(loss="toy", gamma=3.0, every=5)
    module = variant_loss(spec, code_to_cluster=CLUSTERS, num_clusters=C, scale_ids=SCALES,
                          num_scales=2)
    assert isinstance(module, _Toy) and module.gamma == 3.0 and module.num_scales == 2
    logits, targets = torch.randn(2, 5, V, dtype=D), torch.randint(0, V, (2, 5))
    assert torch.allclose(module(logits, targets)[0], 3 * cross_entropy_loss(logits, targets))
    with pytest.raises(ValueError, match="_ToyParams.loss must be Literal\\['toy2'\\]"):
        losses.declare(LossDeclaration("toy2", _ToyParams, _Toy))
    with pytest.raises(ValueError, match="declared twice"):
        losses.declare(toy)


def test_the_toy_is_gone_after_its_test():
    assert "toy" not in LOSSES and "toy" not in DECLARATIONS


def test_a_bad_loss_setting_is_one_line_in_the_params_format(toy):
    params = _params({"ce": {"loss": "ce"}, "up": {"loss": "up", "kappa": -1},
                      "ls": {"loss": "ls", "alpha": 0.1}, "t": {"loss": "toy", "gamma": "x"},
                      "f": {"loss": "focal"}})
    with pytest.raises(ParamsError) as err:
        check_variants(params)
    assert err.value.lines[0] == "params.yaml: variants.up.kappa = -1: Input should be greater than 0"
    assert err.value.lines[1] == "params.yaml: variants.ls.alpha = 0.1: Extra inputs are not permitted"
    assert err.value.lines[2].startswith("params.yaml: variants.t.gamma = 'x': Input should be a valid")
    assert err.value.lines[3].startswith("params.yaml: variants.f.loss = 'focal': Input tag 'focal'")
    assert "'toy'" in err.value.lines[3] and len(err.value.lines) == 4


def test_derived_holds_what_the_declaration_says_needs_the_teacher(toy):
    ok = _params({"ce": {"loss": "ce"}, "t": {"loss": "toy", "gamma": 2}},
                 {"t_big": {"loss": "toy", "gamma": 20}, "ts": {"loss": "ts"},
                  "up_t": {"loss": "up", "reference": "teacher"}})
    assert list(check_variants(ok)) == ["ce", "t", "t_big", "ts", "up_t"]
    wrong = _params({"ce": {"loss": "ce"}, "t_big": {"loss": "toy", "gamma": 20},
                     "ts": {"loss": "ts"}}, {"t": {"loss": "toy", "gamma": 2}})
    with pytest.raises(ParamsError) as err:
        check_variants(wrong)
    assert err.value.lines == [
        "params.yaml: variants.t_big needs the teacher model: declare it under `derived`",
        "params.yaml: variants.ts needs the teacher model: declare it under `derived`",
        "params.yaml: derived.t does not need the teacher model (only those that do belong "
        "here): declare it under `variants`"]


# -- temperature scaling ---------------------------------------------------


def test_calibrator_recovers_known_temperature_per_scale():
    gen = torch.Generator().manual_seed(0)
    n, vocab, true = 6000, 16, (2.0, 0.5, 1.0)
    logits = torch.randn(3 * n, vocab, generator=gen) * 3
    scale = torch.arange(3).repeat_interleave(n)
    temps = torch.tensor(true)[scale].unsqueeze(1)
    targets = torch.multinomial(torch.softmax(logits / temps, -1), 1, generator=gen).squeeze(1)
    calibrator = TemperatureCalibrator(num_scales=4)
    assert torch.equal(calibrator.temperatures, torch.ones(4, dtype=D))
    fitted = calibrator.fit(logits, targets, scale)
    for s, value in enumerate(true):
        assert abs(float(fitted[s]) / value - 1) < 0.05, (s, float(fitted[s]))
    assert float(fitted[3]) == 1.0  # no tokens of scale 3: unchanged
    restored = TemperatureCalibrator(num_scales=4)
    restored.load_state_dict(calibrator.state_dict())
    assert torch.equal(restored.temperatures, fitted)


def test_fit_temperature_is_the_nll_minimiser():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 10, generator=gen, dtype=D) * 2
    targets = torch.multinomial(torch.softmax(logits / 1.3, -1), 1, generator=gen).squeeze(1)
    best = fit_temperature(logits, targets)

    def nll(temp):
        return float(F.cross_entropy(logits / temp, targets))

    assert nll(best) <= min(nll(best * 0.999), nll(best * 1.001))
    # Every prediction right: the NLL falls as T -> 0, T stops at its bound.
    assert fit_temperature(logits, logits.argmax(-1), bounds=(0.1, 50.0)) == pytest.approx(0.1)



@pytest.mark.parametrize("penalty", ["w2", "variance"])
def test_given_reference_equals_plain_composition(penalty):
    """The fused loss with a caller-given p_ref (teacher, empirical) equals CE +
    dispersion_penalty + SE match computed by autograd, value and gradient."""
    torch.manual_seed(3)
    V, C = 16, 4
    c2c = torch.arange(V) % C
    z = torch.randn(3, 5, V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (3, 5))
    ref = torch.softmax(torch.randn(3, 5, V, dtype=torch.float64), -1)
    loss = UncertaintyPreservingLoss(**{**UP_OPTIONS, "reference": "teacher", "penalty": penalty,
                                        "kappa": 3.0, "lambda_disp": 1.0, "lambda_se": 1.0},
                                     code_to_cluster=c2c, num_clusters=C)
    total, _ = loss(z, y, reference=ref)
    p = z.softmax(-1)
    plain = (F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view(3, 5)
             + dispersion_penalty(p, ref, 3.0, penalty)
             + (semantic_entropy(p, c2c, C) - semantic_entropy(ref, c2c, C)).square())
    assert torch.allclose(total, plain, atol=1e-12)
    g_fused, = torch.autograd.grad(total.sum(), z)
    g_plain, = torch.autograd.grad(plain.sum(), z)
    assert torch.allclose(g_fused, g_plain, atol=1e-12)


def test_reference_that_differs_moves_dispersion_towards_it():
    """With p_ref flatter than p, the up gradient is not CE's, and a step along it
    (minus CE's step) raises the model's Dirichlet variance towards the reference's."""
    torch.manual_seed(0)
    V = 32
    z = (torch.randn(64, V, dtype=torch.float64) * 3).requires_grad_()
    y = z.detach().argmax(-1)
    ref = torch.softmax(z.detach() / 3.0, -1)  # same ranking, far wider
    loss = UncertaintyPreservingLoss(**{**UP_OPTIONS, "reference": "teacher", "lambda_disp": 1.0,
                                        "lambda_se": 0.0})
    total, parts = loss(z, y, reference=ref)
    g_up, = torch.autograd.grad(total.sum(), z)
    g_ce, = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    assert not torch.allclose(g_up, g_ce)
    assert parts["disp"].min() > 0
    step = -(g_up - g_ce)  # the penalty's own descent direction
    var = dirichlet_variance(z.detach().softmax(-1), 1.0).sum(-1)
    moved = dirichlet_variance((z.detach() + 1e-2 * step).softmax(-1), 1.0).sum(-1)
    ref_var = dirichlet_variance(ref, 1.0).sum(-1)
    assert (ref_var > var).all() and (moved > var).all()
    gap_after = dispersion_penalty((z.detach() + 1e-2 * step).softmax(-1), ref, 1.0)
    assert (gap_after < parts["disp"]).all()


def test_reference_argument_is_required_exactly_when_the_reference_is_external():
    z, y = torch.randn(2, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs reference"):
        UncertaintyPreservingLoss(**{**UP_OPTIONS, "reference": "empirical"})(z, y)
    with pytest.raises(ValueError, match="takes no"):
        UncertaintyPreservingLoss(**{**UP_OPTIONS, "reference": "smoothed"})(
            z, y, reference=z.softmax(-1))


def _study_batch(n=256, vocab=512, prior=100.0):
    """One batch built like the over-confidence study: per token a context seen n(c) =
    100-200 times over 20-40 codes, a_0 = 100 spread uniformly; a student over-confident
    on the data; a calibrated teacher = softmax(z / T) of logits near the student's.
    Returns (student logits, targets, empirical p_ref, kappa_ref, teacher p)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(n, vocab, dtype=D)
    for row in counts:
        support = torch.randperm(vocab, generator=gen)[:int(torch.randint(20, 41, (1,), generator=gen))]
        weight = torch.rand(len(support), generator=gen, dtype=D) ** 2 + 0.05
        draws = torch.multinomial(weight, int(torch.randint(100, 201, (1,), generator=gen)),
                                  replacement=True, generator=gen)
        row[support] = draws.bincount(minlength=len(support)).to(D)
    n_c = counts.sum(1, keepdim=True)
    p_ref, kappa_ref = (counts + prior / vocab) / (n_c + prior), (n_c + prior).squeeze(1)
    targets = torch.multinomial(counts / n_c, 1, generator=gen).squeeze(1)
    z = 1.5 * (counts / n_c + 1e-3).log() + 0.5 * torch.randn(n, vocab, generator=gen, dtype=D)
    teacher = ((z + 0.3 * torch.randn(n, vocab, generator=gen, dtype=D)) / 1.6).softmax(-1)
    return z, targets, p_ref, kappa_ref, teacher


def test_empirical_dispersion_term_is_as_strong_as_the_teachers():
    """At the study's counts the empirical reference's L_disp (read at up.kappa, like
    every reference) is within a factor 3 of the teacher's on the same batch; read at
    the counts' own evidence kappa_ref(c) = n(c) + a_0 (the old specification) it was
    more than 30x smaller: switched off."""
    z, y, p_ref, kappa_ref, teacher = _study_batch()
    assert 200 <= kappa_ref.min() and kappa_ref.max() <= 300
    disp = {}
    for name, ref in (("empirical", p_ref), ("teacher", teacher)):
        loss = UncertaintyPreservingLoss(**{**UP_OPTIONS, "reference": name, "lambda_disp": 1.0})
        disp[name] = float(loss(z, y, reference=ref)[1]["disp"].mean())
    assert 1 / 3 < disp["empirical"] / disp["teacher"] < 3
    p = z.softmax(-1)
    old = (dirichlet_variance(p, kappa_ref).sqrt()
           - dirichlet_variance(p_ref, kappa_ref).sqrt()).square().sum(-1).mean()
    assert disp["empirical"] > 30 * float(old)
