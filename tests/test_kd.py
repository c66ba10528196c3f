"""Knowledge distillation (`kd`): loss and gradient against hand-computed values, and
its declaration (the teacher's reference, the `derived` group, its weight)."""

import math

import pytest
import torch

from tests.project import params_from_yaml
from up.core.params import ParamsError
from up.training.losses import (
    KDParams,
    KnowledgeDistillation,
    build_token_loss,
    check_variants,
    declaration,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


# Two tokens over V = 3: p = (1, 2, 3) / 6 with target 2, and uniform with target 0.
Z = t([0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0])
Y = torch.tensor([2, 0])
TEACHER = t([0.5, 0.25, 0.25], [0.2, 0.3, 0.5])


def test_kd_loss_and_gradient_by_hand():
    z = Z.clone().requires_grad_()
    total, parts = KnowledgeDistillation(lambda_kd=0.5)(z, Y, reference=TEACHER)
    ce = [math.log(2), math.log(3)]
    kl = [0.5 * math.log(3) + 0.25 * math.log(0.75) + 0.25 * math.log(0.5),
          0.2 * math.log(0.6) + 0.3 * math.log(0.9) + 0.5 * math.log(1.5)]
    assert parts["ce"].tolist() == pytest.approx(ce, abs=1e-12)
    assert parts["kd"].tolist() == pytest.approx(kl, abs=1e-12)
    assert total.tolist() == pytest.approx([c + 0.5 * k for c, k in zip(ce, kl, strict=True)],
                                           abs=1e-12)
    assert not parts["kd"].requires_grad and not parts["ce"].requires_grad
    # dL/dz = softmax(z) - onehot(y) + lambda (softmax(z) - p_T)
    grad, = torch.autograd.grad(total.sum(), z)
    assert torch.allclose(grad, t([0.0, 3 / 8, -3 / 8], [-3 / 5, 7 / 20, 1 / 4]), atol=1e-12)


def test_kd_is_ce_without_weight_or_gap():
    ce = torch.nn.functional.cross_entropy(Z, Y, reduction="none")
    total, parts = KnowledgeDistillation(lambda_kd=0.0)(Z, Y, reference=TEACHER)
    assert torch.allclose(total, ce, atol=1e-15)
    assert (parts["kd"] > 0).all()  # still logged
    same = Z.softmax(-1)  # the teacher predicts what the student does: KL = 0
    total, parts = KnowledgeDistillation(lambda_kd=7.0)(Z, Y, reference=same)
    assert parts["kd"].abs().max() < 1e-12 and torch.allclose(total, ce, atol=1e-12)


def test_kd_computes_in_float32_and_needs_the_teacher():
    loss = build_token_loss("kd", lambda_kd=2.0)
    assert loss.needs_reference and loss.weights == {"kd": 2.0}
    total, parts = loss(Z.to(torch.bfloat16), Y, reference=TEACHER.float())
    assert total.dtype == torch.float32 and parts["kd"].dtype == torch.float32
    with pytest.raises(ValueError, match="needs reference"):
        loss(Z, Y)
    with pytest.raises(ValueError, match="lambda_kd=-1"):
        KnowledgeDistillation(lambda_kd=-1)


def test_kd_is_declared_against_the_teacher_under_derived(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kd = declaration("kd")
    spec = KDParams(loss="kd", lambda_kd=8.0)
    assert kd.module is KnowledgeDistillation and kd.reference(spec) == "teacher"
    assert kd.needs_teacher(spec)
    ok = params_from_yaml(variants={"ce": {"loss": "ce"}}, teacher="ce",
                          derived={"kd": {"loss": "kd", "lambda_kd": 8.0}})
    assert check_variants(ok)["kd"] == spec
    wrong = params_from_yaml(variants={"ce": {"loss": "ce"}, "kd": {"loss": "kd", "lambda_kd": 8.0}},
                             teacher="ce", derived={})
    with pytest.raises(ParamsError, match="variants.kd needs the teacher model"):
        check_variants(wrong)
    bad = params_from_yaml(variants={"ce": {"loss": "ce"}}, teacher="ce",
                           derived={"kd": {"loss": "kd", "lambda_kd": -1}})
    with pytest.raises(ParamsError, match="derived.kd.lambda_kd = -1"):
        check_variants(bad)
