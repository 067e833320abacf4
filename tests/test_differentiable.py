"""The differentiable exact route and features: the same values as the plain route, and gradients that agree with
central finite differences (float64 LeNet-5, directions inside the [0, 1] box: the model clips its input, so its
Jacobian jumps at the box's faces)."""

import numpy as np
import pytest
import torch

from service.data.mnist import load_mnist
from service.detect.features import SHIPPED_FEATURE_SET, differentiable_features, feature_names, fisher_features
from service.fisher import fisher_spectrum
from service.fisher.differentiable import differentiable_spectrum
from service.zoo.registry import load_model


@pytest.fixture(scope="module")
def model64():
    return load_model("lenet5", device="cpu").module.double()


@pytest.fixture(scope="module")
def digits():
    images, _ = load_mnist("val")
    x = images[:3].double()
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float64) * ((x > 0.05) & (x < 0.95))
    return x, direction / direction.norm()


def _directional(function, x, direction, h=1e-5):
    with torch.no_grad():
        return float((function(x + h * direction) - function(x - h * direction)) / (2 * h))


def _gradient_along(function, x, direction):
    leaf = x.clone().requires_grad_(True)
    function(leaf).backward()
    return float((leaf.grad * direction).sum())


def test_the_differentiable_spectrum_equals_the_exact_route(model64, digits):
    x, _ = digits
    plain = fisher_spectrum(model64, x, k=12, method="exact", return_vectors=True, return_margin=True)
    graph = differentiable_spectrum(model64, x, k=12, return_vectors=True, return_margin=True)
    torch.testing.assert_close(graph.eigenvalues.detach(), plain.eigenvalues, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(graph.margin.detach(), plain.margin, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(graph.margin_gradient.detach(), plain.margin_gradient, rtol=1e-8, atol=1e-12)
    cos = (graph.eigenvectors[:, :3].detach().flatten(2) * plain.eigenvectors[:, :3].flatten(2)).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-6)  # up to sign


@pytest.mark.parametrize("index", [0, 1, 4])
def test_eigenvalue_gradients_match_finite_differences(model64, digits, index):
    x, direction = digits
    log_lambda = lambda t: differentiable_spectrum(model64, t, k=9).eigenvalues[:, index].log().sum()  # noqa: E731
    expected = _directional(log_lambda, x, direction)
    assert _gradient_along(log_lambda, x, direction) == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_the_differentiable_features_equal_the_screened_ones(model64, digits):
    x, _ = digits
    np.testing.assert_allclose(differentiable_features(model64, x, SHIPPED_FEATURE_SET).detach().numpy(),
                               fisher_features(model64, x, SHIPPED_FEATURE_SET).matrix, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("column", ["log10_lambda_2", "noise2.0_mean_log10_kl", "step1.0_max_log10_kl",
                                    "margin_log10_distance", "fine_log10_rayleigh", "effective_rank",
                                    "squeeze0.5_step2.0_log10_kl"])
def test_feature_gradients_match_finite_differences(model64, digits, column):
    x, direction = digits
    index = feature_names(SHIPPED_FEATURE_SET).index(column)
    value = lambda t: differentiable_features(model64, t, SHIPPED_FEATURE_SET)[:, index].sum()  # noqa: E731
    expected = _directional(value, x, direction, h=1e-6)
    assert _gradient_along(value, x, direction) == pytest.approx(expected, rel=2e-3, abs=1e-6)
