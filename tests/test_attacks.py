"""The attacks of service.attacks: their definitions, their L2 budgets and the [0, 1] box, and bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.attacks import bim, cw_l2, fgm, iterative_ossa, least_norm_search, ossa, otcm
from service.attacks.common import predict
from service.attacks.gradient import fgm_direction
from service.attacks.ossa import signed_step, top_direction
from service.fisher import dense_fisher, dense_spectrum


def ce(model, x, labels) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), labels, reduction="none")


def manual_gradient(model, x, labels) -> torch.Tensor:
    """grad_x CE per image, one image at a time with plain autograd."""
    grads = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), labels[i : i + 1])
        grads.append(torch.autograd.grad(loss, xi)[0][0])
    return torch.stack(grads)


def assert_budget(model, result, x, epsilon: float) -> None:
    """The perturbation respects its L2 budget and the image stays in the box; the report is true."""
    adv = result.adversarial
    assert adv.shape == x.shape
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= epsilon + 1e-5).all(), norms.max()
    torch.testing.assert_close(result.perturbation_norm, norms)
    assert torch.equal(result.adversarial_prediction, predict(model, adv).argmax(-1))
    assert torch.equal(result.original_prediction, predict(model, x).argmax(-1))
    assert torch.equal(result.fooled, result.adversarial_prediction != result.labels)


# --- OSSA ------------------------------------------------------------------------------------------------

def test_ossa_increases_loss(case):
    x = case.images
    result = ossa(case.model, x, epsilon=0.3)
    labels = result.labels
    assert torch.equal(labels, result.original_prediction), "labels default to the prediction"
    assert (ce(case.model, result.adversarial, labels) > ce(case.model, x, labels)).all()
    assert_budget(case.model, result, x, 0.3)
    assert "top_eigenvalue" in result.extras


def test_ossa_direction_is_dense_top_eigenvector(case64):
    """Unclipped, the OSSA step is +/- epsilon times the dense top eigenvector, signed to raise the loss."""
    model, x, eps = case64.model, case64.images, 0.05
    result = ossa(model, x, epsilon=eps, method="exact")
    for i in range(x.shape[0]):
        g, _, _ = dense_fisher(model, x[i])
        evals, evecs = dense_spectrum(g)
        assert evals[0] - evals[1] > 1e-3 * evals[0], "the test needs a clear top eigen-gap"
        delta = (result.adversarial[i] - x[i]).flatten() / eps
        cosine = float(delta @ evecs[:, 0])
        assert abs(cosine) == pytest.approx(1.0, abs=1e-9)
        v = evecs[:, 0].reshape(x[i].shape)
        label = result.labels[i : i + 1]
        chosen, other = (v, -v) if cosine > 0 else (-v, v)
        assert ce(model, (x[i] + eps * chosen)[None], label) >= ce(model, (x[i] + eps * other)[None], label)


def test_iterative_ossa_budget_and_loss(cnn_case):
    x = cnn_case.images
    one = ossa(cnn_case.model, x, epsilon=0.5)
    result = iterative_ossa(cnn_case.model, x, epsilon=0.5, step_size=0.1, steps=8)
    assert_budget(cnn_case.model, result, x, 0.5)
    labels = result.labels
    assert (ce(cnn_case.model, result.adversarial, labels) > ce(cnn_case.model, x, labels)).all()
    assert torch.equal(one.labels, labels)


# --- FGM, OTCM, BIM --------------------------------------------------------------------------------------

def test_fgm_matches_definition(case):
    x, eps = case.images, 0.7
    labels = torch.arange(x.shape[0]) % case.num_classes
    result = fgm(case.model, x, labels, epsilon=eps)
    g = manual_gradient(case.model, x, labels)
    expected = (x + eps * g / g.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))).clamp(0, 1)
    torch.testing.assert_close(result.adversarial, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.labels, labels)
    assert_budget(case.model, result, x, eps)


def test_fgm_clips_to_box(digits):
    """Digits have many pixels at 0 and 1: large steps are clipped, and the norm shrinks accordingly."""
    x = digits.images[:16]
    result = fgm(digits.model, x, digits.labels[:16], epsilon=3.0)
    assert_budget(digits.model, result, x, 3.0)
    assert (result.perturbation_norm < 3.0 - 1e-3).any()


def test_otcm_target_and_definition(case):
    x, eps = case.images, 0.5
    result = otcm(case.model, x, epsilon=eps, seed=5)
    target = result.extras["target"]
    assert (target != result.labels).all()
    assert ((target >= 0) & (target < case.num_classes)).all()
    g = manual_gradient(case.model, x, target)
    expected = (x - eps * g / g.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))).clamp(0, 1)
    torch.testing.assert_close(result.adversarial, expected, rtol=1e-5, atol=1e-6)
    assert_budget(case.model, result, x, eps)
    # stepping toward the target raises its probability
    with torch.no_grad():
        before = torch.softmax(case.model(x), -1).gather(1, target[:, None])
        after = torch.softmax(case.model(result.adversarial), -1).gather(1, target[:, None])
    assert (after > before).all()


def test_otcm_targets_cover_wrong_classes(digits):
    result = otcm(digits.model, digits.images, digits.labels, epsilon=0.1, seed=1)
    target = result.extras["target"]
    assert (target != digits.labels).all()
    assert len(set(target.tolist())) == 10


@pytest.mark.parametrize("eps", [0.2, 1.5])
def test_bim_stays_in_ball(digits, eps):
    x, labels = digits.images[:32], digits.labels[:32]
    result = bim(digits.model, x, labels, epsilon=eps, step_size=0.25, steps=10)
    assert_budget(digits.model, result, x, eps)
    assert (ce(digits.model, result.adversarial, labels) > ce(digits.model, x, labels)).all()
    # iterating beats a single step of the same budget on average
    single = fgm(digits.model, x, labels, epsilon=eps)
    assert ce(digits.model, result.adversarial, labels).mean() >= ce(digits.model, single.adversarial, labels).mean()


# --- Opt (C&W L2) ----------------------------------------------------------------------------------------

def linear_min_norm(model, x, labels) -> torch.Tensor:
    """For a linear softmax model z = W x + b: the smallest L2 step that reaches a decision boundary, ignoring
    the box (a lower bound on any successful attack): min_j (z_y - z_j) / ||w_y - w_j||."""
    linear = model[1]
    w = linear.weight.double()
    with torch.no_grad():
        z = model(x).double()
    out = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        margins = (z[i, y] - z[i]) / (w[y] - w).norm(dim=1).clamp(min=1e-12)
        margins[y] = float("inf")
        out.append(margins.min())
    return torch.stack(out)


def test_cw_fools_and_keeps_best_norm(digits):
    x, labels = digits.images[:32], digits.labels[:32]
    result = cw_l2(digits.model, x, labels, c=5.0, steps=150, lr=0.05)
    assert result.fooling_rate >= 0.95
    assert float(result.adversarial.min()) >= 0 and float(result.adversarial.max()) <= 1
    fooled = result.fooled
    # the kept image is a success and its norm is the one reported
    assert (predict(digits.model, result.adversarial).argmax(-1)[fooled] != labels[fooled]).all()
    assert (result.perturbation_norm[~fooled] == 0).all(), "no success: the original image is returned"
    # no attack can beat the exact least norm of a linear model; Opt comes close to it
    optimum = linear_min_norm(digits.model, x, labels).float()
    ratio = result.perturbation_norm[fooled] / optimum[fooled]
    assert (ratio >= 1 - 1e-3).all()
    assert float(ratio.median()) <= 1.5


def test_cw_max_norm_projects(digits):
    x, labels = digits.images[:16], digits.labels[:16]
    result = cw_l2(digits.model, x, labels, c=5.0, steps=50, max_norm=0.3)
    assert_budget(digits.model, result, x, 0.3)


# --- least-norm search -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["ossa", "fgm"])
def test_least_norm_search_brackets(digits, attack):
    model, x, labels, tol = digits.model, digits.images[:24], digits.labels[:24], 1e-3
    result = least_norm_search(model, x, labels, attack=attack, tol=tol)
    found = result.found
    assert found.sum() >= 20
    assert torch.isinf(result.least_norm[~found]).all()
    least, lower = result.least_norm[found], result.lower[found]
    assert ((least - lower) <= tol + 1e-7).all() and (least > lower).all()
    assert ((least >= 0) & (least <= 6)).all()
    # at least_norm the returned image fools; at lower it does not
    assert (result.adversarial_prediction[found] != labels[found]).all()
    assert (result.perturbation_norm[found] <= least + 1e-5).all()
    if attack == "fgm":
        direction = fgm_direction(model, x, labels)
        at_lower = (x[found] + lower.view(-1, 1, 1, 1) * direction[found]).clamp(0, 1)
    else:
        direction, _ = top_direction(model, x)
        at_lower = signed_step(model, x[found], direction[found], labels[found], lower)
    assert (predict(model, at_lower).argmax(-1) == labels[found]).all()


def test_least_norm_not_found_and_already_fooled(digits):
    model, x, labels = digits.model, digits.images[:8], digits.labels[:8].clone()
    tiny = least_norm_search(model, x, labels, attack="fgm", high=1e-3, tol=1e-4)
    assert not tiny.found.any()
    assert torch.isinf(tiny.least_norm).all()
    assert torch.allclose(tiny.lower, torch.full_like(tiny.lower, 1e-3))
    wrong = (labels + 1) % 10  # the model already disagrees with these labels
    already = least_norm_search(model, x, wrong, attack="fgm")
    assert already.found.all() and (already.least_norm == 0).all()


# --- bad arguments ---------------------------------------------------------------------------------------

ATTACK_CALLS = {
    "ossa": lambda m, x, **kw: ossa(m, x, **kw),
    "iterative_ossa": lambda m, x, **kw: iterative_ossa(m, x, steps=1, **kw),
    "fgm": lambda m, x, **kw: fgm(m, x, **kw),
    "otcm": lambda m, x, **kw: otcm(m, x, **kw),
    "bim": lambda m, x, **kw: bim(m, x, steps=1, **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACK_CALLS))
def test_attacks_refuse_bad_arguments(mlp_case, name):
    attack = ATTACK_CALLS[name]
    model, x = mlp_case.model, mlp_case.images
    with pytest.raises(ValueError, match=r"^epsilon:"):
        attack(model, x, epsilon=-0.1)
    with pytest.raises(ValueError, match=r"^epsilon:"):
        attack(model, x, epsilon=float("nan"))
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^images:.*NaN"):
        attack(model, bad, epsilon=0.1)
    with pytest.raises(ValueError, match=r"^images:.*empty"):
        attack(model, x[:0], epsilon=0.1)
    with pytest.raises(ValueError, match=r"^images:.*does not fit"):
        attack(model, torch.rand(2, 3, 5, 5), epsilon=0.1)
    for labels in (torch.tensor([0, 1, 2, 7]), torch.tensor([0, -1, 2, 3]), torch.tensor([0, 1]),
                   torch.tensor([0.0, 1.0, 2.0, 3.0])):
        with pytest.raises(ValueError, match=r"^labels:"):
            attack(model, x, labels=labels, epsilon=0.1)


def test_other_bad_arguments(mlp_case):
    model, x = mlp_case.model, mlp_case.images
    with pytest.raises(ValueError, match=r"^method:"):
        ossa(model, x, epsilon=0.1, method="svd")
    with pytest.raises(ValueError, match=r"^steps:"):
        bim(model, x, epsilon=0.1, steps=0)
    with pytest.raises(ValueError, match=r"^steps:"):
        cw_l2(model, x, steps=0)
    with pytest.raises(ValueError, match=r"^c:"):
        cw_l2(model, x, c=-1.0)
    with pytest.raises(ValueError, match=r"^max_norm:"):
        cw_l2(model, x, steps=1, max_norm=-1.0)
    with pytest.raises(ValueError, match=r"^labels:"):
        cw_l2(model, x, torch.tensor([9, 0, 0, 0]), steps=1)
    with pytest.raises(ValueError, match=r"^attack:"):
        least_norm_search(model, x, attack="bim")
    with pytest.raises(ValueError, match=r"high"):
        least_norm_search(model, x, low=2.0, high=1.0)
    with pytest.raises(ValueError, match=r"^tol:"):
        least_norm_search(model, x, tol=-1.0)


# ---- the table of attack specs (service.attacks.specs) ----

def test_every_spec_names_its_functions_keyword_arguments():
    """Each spec's options and budget are exactly the keyword arguments its function takes after (model, images,
    labels): the table cannot offer an option that the function lacks, nor hide one."""
    import inspect

    from service.attacks import ATTACK_SPECS

    for spec in ATTACK_SPECS.values():
        params = [p for p in inspect.signature(spec.function).parameters if p not in ("model", "images", "labels")]
        offered = set(spec.options.model_fields) | ({spec.budget} if spec.budget else set())
        assert offered <= set(params), (spec.name, offered - set(params))
        assert set(params) - offered <= {"method"}, (spec.name, set(params) - offered)  # least-norm's route
        for name, field in spec.options.model_fields.items():
            default = inspect.signature(spec.function).parameters[name].default
            assert field.default == default, (spec.name, name, field.default, default)


def test_every_attack_is_called_the_same_way_and_equals_its_function(digits):
    from service.attacks import ATTACK_SPECS, AttackResult

    x, y = digits.images[:4], digits.labels[:4]
    few = {"iterative-ossa": {"steps": 3}, "bim": {"steps": 3}, "opt": {"steps": 5}, "least-norm": {"tol": 0.05}}
    for spec in ATTACK_SPECS.values():
        options = few.get(spec.name, {})
        result = spec.bind(1.5, options)(digits.model, x, y)
        assert isinstance(result, AttackResult) and result.adversarial.shape == x.shape, spec.name
        direct = spec.function(digits.model, x, y, **options, **({spec.budget: 1.5} if spec.budget else {}))
        torch.testing.assert_close(result.adversarial, direct.adversarial, rtol=0, atol=0)
        assert bool((result.perturbation_norm <= 1.5 + 1e-4).all()) or spec.budget is None, spec.name


def test_options_are_checked_by_the_spec():
    from service.attacks import attack_spec

    with pytest.raises(ValueError, match="it takes: step_size, steps"):
        attack_spec("bim").check_options({"c": 1.0})
    with pytest.raises(ValueError, match="steps"):
        attack_spec("bim").check_options({"steps": 0})
    with pytest.raises(ValueError, match="finite"):
        attack_spec("opt").check_options({"c": float("nan")})
    with pytest.raises(ValueError, match="unknown attack"):
        attack_spec("pgd")


def test_the_api_and_the_jobs_take_the_tables_attacks():
    import typing

    from service.api.schemas import AttackName
    from service.attacks import ATTACK_NAMES
    from service.jobs.kinds.attack import AttackParams

    assert typing.get_args(AttackName) == ATTACK_NAMES
    for name in ATTACK_NAMES:
        assert AttackParams(attack=name).attack == name
