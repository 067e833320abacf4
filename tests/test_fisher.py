"""The spectrum routes of service.fisher against dense float64 references built from the full Jacobian."""

from __future__ import annotations

import pytest
import torch

from service.fisher import dense_fisher, dense_spectrum, fisher_by_class_sum, fisher_spectrum


def dense_reference(model, images) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per image: dense eigenvalues (N, D) descending, eigenvectors (N, D, D) as columns, and the Jacobians."""
    evals, evecs, jacs = [], [], []
    for image in images:
        g, jac, _ = dense_fisher(model, image)
        e, v = dense_spectrum(g)
        evals.append(e)
        evecs.append(v)
        jacs.append(jac)
    return torch.stack(evals), torch.stack(evecs), jacs


@pytest.fixture(scope="session")
def reference(case):
    return dense_reference(case.model, case.images)


@pytest.fixture(scope="session")
def reference64(case64):
    return dense_reference(case64.model, case64.images)


def relative_error(values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue error per image, relative to the top dense eigenvalue."""
    n = values.shape[1]
    return (values.double() - dense[:, :n]).abs().amax(1) / dense[:, 0]


def check_vectors(spectrum, dense_evals, dense_evecs, image_shape, tol: float) -> int:
    """Unit norm and image shape; equal to the dense eigenvectors up to sign where the eigen-gap is clear.

    Returns how many vectors were compared against the dense ones."""
    vectors = spectrum.eigenvectors
    n, r = vectors.shape[:2]
    assert vectors.shape[2:] == image_shape
    flat = vectors.flatten(2).double()
    compared = 0
    for i in range(n):
        top = dense_evals[i, 0]
        for j in range(r):
            if spectrum.eigenvalues[i, j] <= 1e-6 * top:
                continue  # no direction for a numerically zero eigenvalue
            assert flat[i, j].norm() == pytest.approx(1.0, abs=1e-5)
            gap = min((dense_evals[i, j] - dense_evals[i, j + 1]).abs(),
                      (dense_evals[i, j - 1] - dense_evals[i, j]).abs() if j > 0 else torch.inf)
            if gap < 1e-2 * top:
                continue
            cosine = (flat[i, j] @ dense_evecs[i, :, j]).abs()
            assert cosine == pytest.approx(1.0, abs=tol), (i, j, float(gap / top))
            compared += 1
    return compared


# --- the exact Gram route --------------------------------------------------------------------------------

def test_exact_matches_dense_float32(case, reference):
    evals, evecs, _ = reference
    k = case.num_classes - 1
    spectrum = fisher_spectrum(case.model, case.images, k=k, method="exact", return_vectors=True)
    assert spectrum.method == "exact"
    assert spectrum.eigenvalues.shape == (case.images.shape[0], k)
    assert spectrum.eigenvalues.dtype == torch.float64
    assert (spectrum.eigenvalues[:, :-1] >= spectrum.eigenvalues[:, 1:]).all(), "descending"
    assert (relative_error(spectrum.eigenvalues, evals) <= 1e-5).all()
    # the reported error bound holds
    assert ((spectrum.eigenvalues - evals[:, :k]).abs().amax(1) <= spectrum.error_bound).all()
    assert check_vectors(spectrum, evals, evecs, case.shape, tol=1e-4) > 0


def test_exact_matches_dense_float64(case64, reference64):
    evals, evecs, _ = reference64
    k = case64.num_classes - 1
    spectrum = fisher_spectrum(case64.model, case64.images, k=k, method="exact", return_vectors=True)
    assert spectrum.eigenvectors.dtype == torch.float64
    assert (relative_error(spectrum.eigenvalues, evals) <= 1e-10).all()
    assert check_vectors(spectrum, evals, evecs, case64.shape, tol=1e-9) > 0


def test_probabilities_and_predictions(case):
    spectrum = fisher_spectrum(case.model, case.images, k=2, method="exact")
    with torch.no_grad():
        p = torch.softmax(case.model(case.images).double(), -1)
    torch.testing.assert_close(spectrum.probabilities, p, rtol=1e-5, atol=1e-6)
    assert torch.equal(spectrum.predictions, p.argmax(-1))


def test_rank_and_zeros_beyond_it(case, reference):
    evals, _, _ = reference
    big_k = case.num_classes + 3
    spectrum = fisher_spectrum(case.model, case.images, k=big_k, method="exact", return_vectors=True)
    rank = case.num_classes - 1
    assert spectrum.eigenvalues.shape[1] == big_k
    assert (spectrum.eigenvalues[:, rank:] == 0).all()
    assert (spectrum.eigenvalues[:, :rank] > 0).all()
    assert spectrum.eigenvectors.shape[1] == rank, "no vectors beyond the rank"
    assert spectrum.rank_bound == rank
    # the dense matrix agrees: rank <= K - 1
    assert (evals[:, rank:].abs() <= 1e-5 * evals[:, :1]).all()


def test_rank_float64_dense(case64, reference64):
    evals, _, _ = reference64
    rank = case64.num_classes - 1
    assert (evals[:, rank:].abs() <= 1e-12 * evals[:, :1]).all()
    assert (evals[:, rank - 1] > 1e-12 * evals[:, 0]).all()


def test_identity_equals_paper_class_sum(case64, reference64):
    """G_x = J^T (diag(p) - p p^T) J equals equation (4), sum_i p_i g_i g_i^T, with g_i from autograd."""
    model, image = case64.model, case64.images[0]
    g, jac, p = dense_fisher(model, image)
    grads = []
    for i in range(case64.num_classes):
        x = image.unsqueeze(0).clone().requires_grad_(True)
        loss = -torch.log_softmax(model(x), -1)[0, i]
        grads.append(torch.autograd.grad(loss, x)[0].flatten())
    grads = torch.stack(grads)
    by_sum = (grads.T * p) @ grads
    torch.testing.assert_close(g, by_sum, rtol=1e-10, atol=1e-12 * float(g.abs().max()))
    torch.testing.assert_close(fisher_by_class_sum(jac, p), g, rtol=1e-10, atol=1e-12 * float(g.abs().max()))


# --- Lanczos ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4])
def test_lanczos_within_error_bound(case, reference, k):
    evals, evecs, _ = reference
    spectrum = fisher_spectrum(case.model, case.images, k=k, method="lanczos", tol=1e-8, return_vectors=True)
    assert spectrum.method == "lanczos"
    err = (spectrum.eigenvalues - evals[:, :k]).abs().amax(1)
    assert (err <= spectrum.error_bound).all(), (err, spectrum.error_bound)
    assert (relative_error(spectrum.eigenvalues, evals) <= 1e-5).all()
    assert (spectrum.iterations >= 1).all()
    check_vectors(spectrum, evals, evecs, case.shape, tol=1e-3)


def test_lanczos_float64(case64, reference64):
    evals, evecs, _ = reference64
    k = 3
    spectrum = fisher_spectrum(case64.model, case64.images, k=k, method="lanczos", tol=1e-12, return_vectors=True)
    err = (spectrum.eigenvalues - evals[:, :k]).abs().amax(1)
    assert (err <= spectrum.error_bound).all()
    assert (relative_error(spectrum.eigenvalues, evals) <= 1e-10).all()
    assert check_vectors(spectrum, evals, evecs, case64.shape, tol=1e-8) > 0


def test_lanczos_few_iterations_reports_its_error(lenet_case):
    """Capped at fewer steps than the Krylov space needs, the returned bound still covers the error."""
    model, images = lenet_case.model, lenet_case.images
    evals, _, _ = dense_reference(model, images)
    spectrum = fisher_spectrum(model, images, k=1, method="lanczos", max_iter=3, tol=1e-12)
    assert (spectrum.iterations == 3).all()
    err = (spectrum.eigenvalues[:, 0] - evals[:, 0]).abs()
    assert (err <= spectrum.error_bound).all()
    # three steps do not converge here: the route says it has no bound rather than a wrong one
    assert torch.isinf(spectrum.error_bound).any()
    assert any("not converged" in note for note in spectrum.notes)
    # Ritz values are lower bounds of the top eigenvalue
    assert (spectrum.eigenvalues[:, 0] <= evals[:, 0] * (1 + 1e-5)).all()


def test_lanczos_k_beyond_rank_pads_zeros(mlp_case):
    spectrum = fisher_spectrum(mlp_case.model, mlp_case.images, k=9, method="lanczos")
    assert spectrum.eigenvalues.shape == (mlp_case.images.shape[0], 9)
    assert (spectrum.eigenvalues[:, mlp_case.num_classes - 1 :] == 0).all()


# --- truncated --------------------------------------------------------------------------------------------

def test_truncated_full_mass_equals_exact(case):
    exact = fisher_spectrum(case.model, case.images, k=5, method="exact", return_vectors=True)
    trunc = fisher_spectrum(case.model, case.images, k=5, method="truncated", mass=1.0, return_vectors=True)
    assert trunc.method == "truncated"
    atol = 1e-7 * float(exact.eigenvalues.max())
    torch.testing.assert_close(trunc.eigenvalues, exact.eigenvalues, rtol=1e-6, atol=atol)
    assert (trunc.discarded_mass == 0).all()


@pytest.mark.parametrize("mass", [0.5, 0.9])
def test_truncated_reports_discarded_mass_and_error(cnn_case, mass):
    """The kept terms of equation (4): G - G_M = sum_(i dropped) p_i g_i g_i^T is PSD with norm
    <= delta max ||g_i||^2 <= 2 delta ||J||^2, so 0 <= lambda_i - lambda_i^M <= 2 delta ||J||^2."""
    model, images = cnn_case.model, cnn_case.images
    evals, _, jacs = dense_reference(model, images)
    spectrum = fisher_spectrum(model, images, k=3, method="truncated", mass=mass)
    p = spectrum.probabilities
    delta = spectrum.discarded_mass
    assert (delta > 0).all() and (delta <= 1 - mass + 1e-9).all()
    ordered = p.sort(-1, descending=True).values
    for i in range(images.shape[0]):
        # delta is the mass outside the m most probable classes, for some m
        assert float(((1 - delta[i]) - ordered[i].cumsum(0)).abs().min()) <= 1e-9
        bound = 2 * float(delta[i]) * float(torch.linalg.matrix_norm(jacs[i], ord=2)) ** 2
        gap = evals[i, :3] - spectrum.eigenvalues[i]
        rounding = 1e-5 * float(evals[i, 0])
        assert float(gap.max()) <= bound + rounding and float(gap.min()) >= -rounding
    # the kept classes cover at least `mass` for the image that needs most classes
    assert float((1 - delta).max()) >= mass


def test_truncated_max_classes(digits):
    """A confident model, two classes kept: the discarded mass is that of the other eight, and the error
    obeys the 2 delta ||J||^2 bound (relative to lambda_1 it may still be large: lambda_1 itself is small
    when p is concentrated)."""
    model, images = digits.model, digits.images[:6]
    evals, _, jacs = dense_reference(model, images)
    trunc = fisher_spectrum(model, images, k=3, method="truncated", mass=1.0, max_classes=2)
    top2 = trunc.probabilities.sort(-1, descending=True).values[:, :2].sum(-1)
    torch.testing.assert_close(trunc.discarded_mass, 1 - top2, rtol=0, atol=1e-12)
    for i in range(images.shape[0]):
        bound = 2 * float(trunc.discarded_mass[i]) * float(torch.linalg.matrix_norm(jacs[i], ord=2)) ** 2
        assert float((trunc.eigenvalues[i] - evals[i, :3]).abs().max()) <= bound + 1e-5 * float(evals[i, 0])


# --- the paper's Algorithm 1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_power_as_written_converges_to_top(name, mlp_case, cnn_case):
    c = {"mlp": mlp_case, "cnn": cnn_case}[name]
    images = c.images[:2]
    evals, evecs, _ = dense_reference(c.model, images)
    spectrum = fisher_spectrum(c.model, images, k=1, method="power", tol=1e-7, max_iter=400, return_vectors=True)
    assert spectrum.method == "power"
    assert (relative_error(spectrum.eigenvalues, evals) <= 1e-4).all()
    assert spectrum.eigenvectors.shape == (2, 1, *c.shape)
    cosine = (spectrum.eigenvectors.flatten(2)[:, 0].double() * evecs[:, :, 0]).sum(-1).abs()
    assert (cosine >= 0.99).all()


def test_power_runs_the_steps_asked_for(mlp_case):
    spectrum = fisher_spectrum(mlp_case.model, mlp_case.images[:1], k=1, method="power", tol=0, max_iter=7)
    assert spectrum.iterations.tolist() == [7]


def test_power_alias_sane_estimate(case, reference):
    evals, _, _ = reference
    spectrum = fisher_spectrum(case.model, case.images, k=1, method="power-alias", max_iter=30, return_vectors=True)
    assert spectrum.method == "power-alias"
    lam = spectrum.eigenvalues[:, 0]
    assert torch.isfinite(lam).all()
    # lambda* = eta^T G eta for a unit eta: between 0 and the top eigenvalue
    assert (lam > 0).all()
    assert (lam <= evals[:, 0] * (1 + 1e-5)).all()
    norms = spectrum.eigenvectors.flatten(2).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


def test_power_alias_seeded(mlp_case):
    a = fisher_spectrum(mlp_case.model, mlp_case.images, k=1, method="power-alias", seed=3)
    b = fisher_spectrum(mlp_case.model, mlp_case.images, k=1, method="power-alias", seed=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues)


# --- batching and memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["exact", "truncated", "lanczos"])
def test_batch_equals_one_by_one(case, method):
    batch = fisher_spectrum(case.model, case.images, k=3, method=method, tol=1e-9, return_vectors=True)
    for i in range(case.images.shape[0]):
        one = fisher_spectrum(case.model, case.images[i : i + 1], k=3, method=method, tol=1e-9, return_vectors=True)
        top = float(one.eigenvalues[0, 0])
        torch.testing.assert_close(batch.eigenvalues[i], one.eigenvalues[0], rtol=0, atol=2e-6 * top)
        torch.testing.assert_close(batch.probabilities[i], one.probabilities[0])
        if method != "lanczos":
            cos = (batch.eigenvectors[i, 0].flatten() * one.eigenvectors[0, 0].flatten()).sum().abs()
            assert float(cos) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("method", ["exact", "truncated", "lanczos"])
def test_tiny_memory_budget_same_answer(case, method):
    full = fisher_spectrum(case.model, case.images, k=3, method=method, tol=1e-9, mass=0.8)
    tiny = fisher_spectrum(case.model, case.images, k=3, method=method, tol=1e-9, mass=0.8, memory_budget=1)
    atol = 2e-6 * float(full.eigenvalues.max())
    torch.testing.assert_close(tiny.eigenvalues, full.eigenvalues, rtol=0, atol=atol)
    torch.testing.assert_close(tiny.discarded_mass, full.discarded_mass)


def test_class_chunk_same_answer(lenet_case):
    full = fisher_spectrum(lenet_case.model, lenet_case.images, k=9, method="exact")
    chunked = fisher_spectrum(lenet_case.model, lenet_case.images, k=9, method="exact", class_chunk=3)
    torch.testing.assert_close(chunked.eigenvalues, full.eigenvalues, rtol=1e-6, atol=1e-9)


def test_auto_picks_exact_for_small_k(mlp_case):
    assert fisher_spectrum(mlp_case.model, mlp_case.images, k=2).method == "exact"


# --- bad arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0}, "k"),
        ({"k": -2}, "k"),
        ({"k": 1.5}, "k"),
        ({"method": "svd"}, "method"),
        ({"method": "power", "k": 2}, "k"),
        ({"method": "power-alias", "k": 3}, "k"),
        ({"method": "truncated", "mass": 0.0}, "mass"),
    ],
)
def test_bad_arguments(mlp_case, kwargs, name):
    args = {"k": 1, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        fisher_spectrum(mlp_case.model, mlp_case.images, **args)


def test_bad_images(lenet_case):
    model = lenet_case.model
    with pytest.raises(ValueError, match=r"^images:.*empty"):
        fisher_spectrum(model, torch.zeros(0, 1, 28, 28), k=1)
    for value in (float("nan"), float("inf"), float("-inf")):
        x = lenet_case.images.clone()
        x[0, 0, 3, 4] = value
        with pytest.raises(ValueError, match=r"^images:.*NaN or infinite"):
            fisher_spectrum(model, x, k=1)
    for shape in [(2, 3, 28, 28), (2, 1, 20, 20), (2, 784)]:
        with pytest.raises(ValueError, match=r"^images:.*does not fit the model"):
            fisher_spectrum(model, torch.rand(*shape), k=1)
    with pytest.raises(TypeError, match=r"^images:"):
        fisher_spectrum(model, [[0.0]], k=1)
    with pytest.raises(ValueError, match=r"^images:"):
        fisher_spectrum(model, torch.rand(5), k=1)


def test_fisher_factors():
    """S S^T = L L^T = diag(p) - p p^T; the truncated factor for a partial mass too."""
    from service.fisher.gram import reduced_fisher_factor, sqrt_fisher_factor

    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(5, 7, generator=gen, dtype=torch.float64), -1)
    p[0] = torch.tensor([1 - 6e-12] + [1e-12] * 6, dtype=torch.float64)  # nearly one-hot
    a = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    s = sqrt_fisher_factor(p)
    torch.testing.assert_close(s @ s.transpose(1, 2), a, rtol=0, atol=1e-14)
    lower = reduced_fisher_factor(p)
    assert lower.shape == (5, 7, 6)
    torch.testing.assert_close(lower @ lower.transpose(1, 2), a, rtol=0, atol=1e-14)
    q = p[:, :3]
    aq = torch.diag_embed(q) - q.unsqueeze(-1) * q.unsqueeze(-2)
    sq = sqrt_fisher_factor(q)
    torch.testing.assert_close(sq @ sq.transpose(1, 2), aq, rtol=0, atol=1e-14)


def test_truncated_each_image_keeps_its_own_classes(digits):
    """Images of one batch need different class counts; each gets its own, as if alone (and within mass)."""
    model, images = digits.model, digits.images[:12]
    batch = fisher_spectrum(model, images, k=2, method="truncated", mass=0.99)
    counts = set()
    for i in range(images.shape[0]):
        one = fisher_spectrum(model, images[i : i + 1], k=2, method="truncated", mass=0.99)
        torch.testing.assert_close(batch.discarded_mass[i], one.discarded_mass[0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(batch.eigenvalues[i], one.eigenvalues[0], rtol=1e-5, atol=1e-9)
        p = one.probabilities[0].sort(descending=True).values
        counts.add(int(((1 - one.discarded_mass[0]) - p.cumsum(0)).abs().argmin()) + 1)
    assert len(counts) > 1, "the test needs images with different class counts"
    assert (batch.discarded_mass <= 0.01 + 1e-12).all()


@pytest.mark.parametrize("class_chunk", [None, 1])  # None: one pass over copies for these small batches
@pytest.mark.parametrize("method", ["exact", "truncated"])
def test_margin_is_the_top_two_logit_gap_and_its_gradient(case64, class_chunk, method):
    x = case64.images
    spec = fisher_spectrum(case64.model, x, k=3, method=method, return_margin=True, class_chunk=class_chunk)
    plain = fisher_spectrum(case64.model, x, k=3, method=method, class_chunk=class_chunk)
    assert plain.margin is None and plain.margin_gradient is None
    torch.testing.assert_close(spec.eigenvalues, plain.eigenvalues, rtol=1e-10, atol=1e-14)
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        z = case64.model(xi)[0]
        first, second = z.topk(2).indices.tolist()
        (grad,) = torch.autograd.grad(z[first] - z[second], xi)
        torch.testing.assert_close(spec.margin[i], (z[first] - z[second]).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(spec.margin_gradient[i], grad[0], rtol=1e-10, atol=1e-12)


def test_margin_is_refused_by_the_iterative_routes(case):
    with pytest.raises(ValueError, match="return_margin"):
        fisher_spectrum(case.model, case.images, k=1, method="power", return_margin=True)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_replicated_and_separate_backward_passes_agree(case, batch):
    """Small batches take one pass over copies (`replicated_rows`); class_chunk=1 forces separate passes."""
    from service.fisher.gram import REPLICATE_MAX_ROWS, factor_rows

    x = case.images[:batch]
    auto_rows, probs, _, _ = factor_rows(case.model, x, num_classes=case.num_classes)
    separate_rows, _, _, _ = factor_rows(case.model, x, class_chunk=1)
    assert (probs.shape[1] - 1) * 1 <= REPLICATE_MAX_ROWS  # batch 1 exercises the replicated path
    torch.testing.assert_close(auto_rows, separate_rows, rtol=1e-5, atol=1e-6 * float(separate_rows.abs().max()))


@pytest.mark.parametrize("onednn", [True, False])
def test_an_images_spectrum_does_not_depend_on_its_batch_or_the_kernels(onednn):
    """The shipped LeNet-5 on MNIST digits (flat backgrounds: max-pooling ties that rounding breaks): image 0's
    spectrum alone, in batches of 2, 3 and 17 (one pass over copies, and K-1 passes of 17 images), with oneDNN on
    or off as the caller left it, equals the float64 dense reference's; the caller's setting is restored."""
    import copy

    from service.data.mnist import load_mnist
    from service.zoo.registry import load_model

    model = load_model("lenet5", device="cpu").module
    images = load_mnist("test")[0][:17]
    dense = dense_spectrum(dense_fisher(copy.deepcopy(model).double(), images[0].double())[0])[0][:9]
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        for n in (1, 2, 3, 17):
            top = fisher_spectrum(model, images[:n], k=9).eigenvalues[0]
            torch.testing.assert_close(top, dense, rtol=1e-5, atol=1e-5 * float(dense[0]), msg=f"batch of {n}")
            assert torch.backends.mkldnn.enabled is onednn
    finally:
        torch.backends.mkldnn.enabled = previous
