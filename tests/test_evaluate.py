"""The adaptive attacks against their definitions (the straight-through estimator's backward pass is the identity,
the hinge is the margin, every adaptive result lies in the L2 ball and the box and is fooled / flagged exactly as the
model and the real detector say), the surrogate imitates what it is fitted to, and the evaluation, the CLI and the
job run on a small slice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.attacks.common import predict
from service.data.datasets import LabelledImages
from service.data.mnist import load_mnist
from service.detect.files import find_detector, load_detector
from service.evaluate.adaptive import (
    ADAPTIVE_NAMES,
    EFFORTS,
    NOT_FOOLED,
    Effort,
    Target,
    blurred,
    fit_surrogate,
    hinge,
    pgd_l2,
    run_adaptive,
    squeezings,
    straight_through,
)
from service.evaluate.evaluation import EvaluationPlan, build_target, evaluate_detector
from service.evaluate.shifts import gaussian_blur
from service.reports.evaluation_report import write_evaluation_report
from service.zoo.registry import SHIPPED_MODELS, load_model

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 2.0


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return load_model("lenet5", device="cpu").module


@pytest.fixture(scope="module")
def target(lenet: nn.Module) -> Target:
    detector = load_detector(find_detector(SHIPPED_MODELS, "lenet5"), load_model("lenet5", device="cpu").sha256)
    x, y = load_mnist("val")
    built, _ = build_target(lenet, detector, x[:40], y[:40].long(), (BUDGET,), seed=0)
    return built


@pytest.fixture(scope="module")
def digits(lenet: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 4 correctly classified test digits."""
    x, y = load_mnist("test")
    x, y = x[:20], y[:20].long()
    right = predict(lenet, x).argmax(-1) == y
    return x[right][:4], y[right][:4]


def test_straight_through_is_the_transform_forward_and_the_identity_backward() -> None:
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    out = straight_through(x, lambda t: (t >= 0.5).to(t.dtype))
    assert torch.equal(out.detach(), (x.detach() >= 0.5).double())
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.equal(grad, weights)


def test_the_squeezings_quantise_forward_and_pass_gradients() -> None:
    gray = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    quantise = squeezings(gray)[0]
    assert torch.equal(quantise(gray).detach(), (gray.detach() >= 0.5).double())
    color = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(squeezings(color)[0](color), torch.round(color * 31) / 31)
    for squeeze in squeezings(gray):
        (grad,) = torch.autograd.grad(squeeze(gray).sum(), gray)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_hinge_is_the_logit_margin_clipped_at_zero() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    labels = torch.tensor([0, 1])
    # image 0: 3 - 1 + kappa; image 1: 2 - 5 + kappa
    assert torch.allclose(hinge(logits, labels, 0.0), torch.tensor([2.0, 0.0]))
    assert torch.allclose(hinge(logits, labels, 4.0), torch.tensor([6.0, 1.0]))


def test_feature_attacks_use_their_own_effort() -> None:
    full = EFFORTS["full"].for_features()
    assert (full.steps, full.restarts) == (EFFORTS["full"].feature_steps, EFFORTS["full"].feature_restarts)
    for a, b in (("quick", "full"), ("full", "double")):
        assert EFFORTS[b].steps >= EFFORTS[a].steps and EFFORTS[b].feature_steps >= EFFORTS[a].feature_steps


def test_the_surrogate_imitates_the_scores_it_is_fitted_to() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 5))
    scores = 1 / (1 + np.exp(-(2 * features[:, 0] - features[:, 3])))
    surrogate = fit_surrogate(features[:300], scores[:300], seed=0)
    with torch.no_grad():
        predicted = torch.sigmoid(surrogate(torch.from_numpy(features[300:]))).numpy()
    assert np.corrcoef(predicted, scores[300:])[0, 1] > 0.95


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
def test_adaptive_results_lie_in_the_ball_and_box_and_are_screened_as_reported(name, target, digits) -> None:
    x, y = digits
    result = run_adaptive(name, target, x, y, BUDGET, "quick", seed=0)
    norms = (result.adversarial - x).flatten(1).norm(dim=1)
    assert (norms <= BUDGET * (1 + 1e-4)).all() and np.allclose(norms.numpy(), result.norms, atol=1e-6)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    # fooled is the model's own verdict on the returned image; flagged is the real detector's
    assert np.array_equal(result.fooled, (predict(target.model, result.adversarial).argmax(-1) != y).numpy())
    screened = target.detector.score(target.model, result.adversarial)
    assert np.allclose(result.scores, screened.scores)
    assert np.array_equal(result.flagged, screened.scores >= target.detector.threshold)
    # an image the attack could not fool comes back unchanged (its clean self)
    assert torch.equal(result.adversarial[torch.as_tensor(~result.fooled)], x[torch.as_tensor(~result.fooled)])


def test_pgd_from_a_start_begins_at_its_projection_onto_the_ball(target, digits) -> None:
    x, y = digits
    start = blurred(x, sigma=1.0, kappa=0.0)
    assert torch.equal(start, gaussian_blur(x, 1.0))
    budget = 1.0  # below a sigma-1 blur's L2 (about 3 for a digit): the start is projected onto the ball
    expected = x + (start - x) * (budget / (start - x).flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    flat = lambda candidates, labels: (candidates * 0).flatten(1).sum(1)  # noqa: E731  (no gradient: PGD stays)
    wrong = (y + 1) % 10  # every candidate counts as fooled, so the first check keeps it
    once = Effort(steps=1, restarts=1, check_every=1, queries=0, feature_steps=1, feature_restarts=1)
    best_x, keys = pgd_l2(target, flat, x, wrong, budget, once, torch.Generator().manual_seed(0),
                          (x.clone(), np.full(len(x), NOT_FOOLED)), start)
    torch.testing.assert_close(best_x, expected.clamp(0, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(keys, target.keys(expected.clamp(0, 1), wrong), atol=1e-6)


def test_keys_rank_fooled_candidates_by_score_and_the_rest_last(target, digits) -> None:
    x, y = digits
    keys = target.keys(x, y)
    assert np.all(keys == NOT_FOOLED)  # the clean digits are classified right
    wrong = (y + 1) % 10
    keys = target.keys(x, wrong)
    assert np.allclose(keys, target.screen(x)[0])


def test_plan_refuses_unknown_names_and_bad_budgets() -> None:
    for bad in ({"parts": ("heldout", "nonsense")}, {"heldout": ("jsma",)}, {"adaptive": ("nope",)},
                {"budgets": (0.0,)}, {"budgets": ()}, {"effort": "double"}, {"shifts": ("blur=9",)}):
        with pytest.raises(ValueError):
            EvaluationPlan(**bad)


@pytest.fixture(scope="module")
def small_run(lenet: nn.Module, tmp_path_factory):
    loaded = load_model("lenet5", device="cpu")
    detector = load_detector(find_detector(SHIPPED_MODELS, "lenet5"), loaded.sha256)
    val, test = load_mnist("val"), load_mnist("test")
    fit = LabelledImages(val[0][:40].numpy(), val[1][:40].numpy(), [str(i) for i in range(40)], "val", None)
    tst = LabelledImages(test[0][:30].numpy(), test[1][:30].numpy(), [str(i) for i in range(30)], "test", None)
    plan = EvaluationPlan(images=4, budgets=(1.0, 3.0), effort="quick", check_images=2, shift_images=20,
                          fit_images=20, heldout=("deepfool", "pgd-l2"),
                          adaptive=("high-confidence", "surrogate", "score-query"),
                          shifts=("blur=1", "rotation=10"))
    result = evaluate_detector(lenet, detector, fit, tst, plan, loaded.card.class_names)
    out = tmp_path_factory.mktemp("evaluation")
    report = write_evaluation_report(out, result, command="test", machine="test")
    return result, report


def test_the_evaluation_reports_every_part_consistently(small_run) -> None:
    result, report = small_run
    assert {(r["attack"], r["budget"]) for r in result.heldout} == {(a, b) for a in ("deepfool", "pgd-l2")
                                                                     for b in (1.0, 3.0)}
    assert {(r["attack"], r["budget"]) for r in result.adaptive} == {
        (a, b) for a in ("high-confidence", "surrogate", "score-query") for b in (1.0, 3.0)}
    for row in result.heldout + result.adaptive:
        assert 0 <= row["through"] <= row["fooling_rate"] <= 1
    for budget in (1.0, 3.0):
        best = {b["scope"]: b for b in result.best_of if b["budget"] == budget}
        rows = [r for r in result.adaptive if r["budget"] == budget]
        # the best-of lets through at least what its best member does, and the scope with more attacks more
        assert best["white-box"]["through"] >= max(r["through"] for r in rows if r["attack"] != "score-query")
        assert best["any adaptive"]["through"] >= best["white-box"]["through"]
    assert [r["shift"] for r in result.shifts] == ["clean", "blur=1", "rotation=10", "other-source"]
    assert all(0 <= r["fpr"] <= 1 and 0 <= r["squeezing_fpr"] <= 1 for r in result.shifts)
    assert result.effort_check["images"] == 2 and result.surrogate["rows"] == 20 * 5
    text = report.read_text()
    for heading in ("## Held-out attacks", "## Adaptive attacks", "### Per-image best-of", "### Effort check",
                    "## Benign shifts"):
        assert heading in text
    assert (report.parent / "adaptive-tpr.png").stat().st_size > 0
    saved = json.loads((report.parent / "results.json").read_text())
    assert saved["best_of"] == json.loads(json.dumps(result.best_of))


def test_the_command_refuses_bad_arguments_with_a_message(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "service.cli", "evaluate-detector", "--parts", "heldout,bogus",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "bogus" in run.stderr
    run = subprocess.run([sys.executable, "-m", "service.cli", "evaluate-detector", "--detector",
                          str(tmp_path / "none.npz"), "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "none.npz" in run.stderr
