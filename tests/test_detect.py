"""The detector on real MNIST slices and the shipped LeNet-5: features, detection set, training, threshold,
save / load, baselines, and the quick evaluation report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.data.mnist import load_mnist
from service.detect.baselines import KernelDensityScorer, bayesian_uncertainty
from service.detect.dataset import build_detection_set
from service.detect.detector import threshold_at_fpr, train_detector
from service.detect.features import (
    DARK,
    EIGENVALUE_FLOOR,
    FINE_STEPS,
    KL_STEPS,
    MARGIN_STEPS,
    NOISE_DRAWS,
    NOISE_NORMS,
    SQUEEZE_LEVELS,
    SQUEEZE_STEPS,
    feature_names,
    fine_direction,
    fisher_features,
    noise_directions,
    squeeze_direction,
)
from service.detect.files import DetectorLoadError, card_path_for, detector_path, load_detector, save_detector
from service.fisher import dense_fisher, fisher_spectrum
from service.zoo.registry import load_model

ATTACKS = ("fgm", "ossa")  # the fast ones; the builder treats all five alike


@pytest.fixture(scope="session")
def shipped_lenet():
    return load_model("lenet5", device="cpu")


@pytest.fixture(scope="session")
def lenet(shipped_lenet):
    """The shipped LeNet-5 (overrides conftest's random-weight `lenet` in this module)."""
    return shipped_lenet


@pytest.fixture(scope="session")
def val_slice():
    x, y = load_mnist("val")
    return x[:48], y[:48]


@pytest.fixture(scope="session")
def detection(lenet, val_slice):
    return build_detection_set(lenet.module, *val_slice, attacks=ATTACKS, epsilons={"fgm": 4.0, "ossa": 4.0}, seed=3)


@pytest.fixture(scope="session")
def detector(lenet, val_slice):
    x, y = load_mnist("test")
    return train_detector(lenet.module, model_name="lenet5", model_sha256=lenet.sha256, fit_images=val_slice[0],
                          fit_labels=val_slice[1], test_images=x[:24], test_labels=y[:24], attacks=ATTACKS,
                          feature_set="spectral", seed=0, command="pytest").detector


def test_plain_features_are_log10_eigenvalues(lenet, val_slice):
    x = val_slice[0][:6]
    feats = fisher_features(lenet.module, x, "plain", k=20)
    evals = fisher_spectrum(lenet.module, x, k=20, method="exact").eigenvalues.numpy()
    assert feats.matrix.shape == (6, 20)
    np.testing.assert_allclose(feats.matrix, np.log10(np.maximum(evals, EIGENVALUE_FLOOR)), rtol=1e-9, atol=1e-9)
    assert np.all(feats.matrix[:, 9:] == np.log10(EIGENVALUE_FLOOR))  # rank <= K-1 = 9
    assert np.all(np.diff(feats.matrix[:, :9], axis=1) <= 1e-12)  # descending


def test_richer_sets_extend_plain(lenet, val_slice):
    x = val_slice[0][:4]
    plain = fisher_features(lenet.module, x, "plain").matrix
    probs = fisher_features(lenet.module, x, "plain+probs")
    np.testing.assert_allclose(probs.matrix[:, :20], plain, atol=1e-9)
    p = probs.spectrum.probabilities.numpy()
    np.testing.assert_allclose(probs.matrix[:, 21], p.max(1), atol=1e-12)
    for name in ("spectral", "spectral+noise", "spectral+noise+ratios", "spectral+noise+fine",
                 "spectral+noise+fine+squeeze"):
        feats = fisher_features(lenet.module, x, name)
        assert feats.matrix.shape == (4, len(feature_names(name))) and np.isfinite(feats.matrix).all()
        np.testing.assert_allclose(feats.matrix[:, :22], probs.matrix, atol=1e-9)


def test_spectral_features_follow_their_definition(lenet, val_slice):
    x = val_slice[0][:3]
    feats = fisher_features(lenet.module, x, "spectral")
    col = lambda name: feats.matrix[:, feats.names.index(name)]  # noqa: E731
    for i in range(3):
        g, _, p = dense_fisher(lenet.module, x[i])  # float64 G_x from the full Jacobian
        v = torch.linalg.eigh(g)[1].flip(-1)[:, :3].T  # top-3 eigenvectors, unit norm (signs do not matter here)
        xi = x[i].flatten().double()
        np.testing.assert_allclose(col("entropy")[i], float(-(p * p.log()).sum()), atol=1e-6)
        for j in range(3):
            np.testing.assert_allclose(col(f"v{j + 1}_abs_cos_x")[i], float((v[j] @ xi).abs() / xi.norm()), atol=1e-5)
            np.testing.assert_allclose(col(f"v{j + 1}_dark_energy")[i], float((v[j] ** 2)[xi < DARK].sum()), atol=1e-5)
            np.testing.assert_allclose(col(f"v{j + 1}_l1")[i], float(v[j].abs().sum()), rtol=1e-5)
        with torch.no_grad():
            p = torch.softmax(lenet.module(x[i:i + 1]).double(), -1)[0]
            for t in KL_STEPS:
                sides = [(x[i] + s * t * v[0].view_as(x[i]).float()).clamp(0, 1) for s in (1.0, -1.0)]
                kl = max(_log10_kl(p, torch.softmax(lenet.module(side[None]).double(), -1)[0]) for side in sides)
                # frozen-twin rounding, as for the other probes
                np.testing.assert_allclose(col(f"step{t}_max_log10_kl")[i], kl, atol=0.01)


def _column(name: str) -> int:
    return feature_names("spectral+noise").index(name)


def _log10_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(np.log10(max(float((p * (p / q).log()).sum()), 1e-12)))


def test_noise_features_follow_their_definition(lenet, val_slice):
    x = val_slice[0][:3]
    feats = fisher_features(lenet.module, x, "spectral+noise").matrix
    u = noise_directions(x.shape[1:], x.dtype, x.device)
    assert u.shape == (NOISE_DRAWS, *x.shape[1:])
    np.testing.assert_allclose(u.flatten(1).norm(dim=1).numpy(), 1.0, rtol=1e-6)
    with torch.no_grad():
        for i in range(3):
            p = torch.softmax(lenet.module(x[i:i + 1]).double(), -1)[0]
            for r in NOISE_NORMS:
                q = torch.softmax(lenet.module((x[i] + r * u).clamp(0, 1)).double(), -1)
                kls = np.array([_log10_kl(p, q[j]) for j in range(NOISE_DRAWS)])
                flips = float((q.argmax(-1) != p.argmax()).double().mean())
                got = feats[i, [_column(f"noise{r}_{w}") for w in ("mean_log10_kl", "max_log10_kl", "min_log10_kl",
                                                                    "flip_share")]]
                # the features' probes run on the frozen twin: float32 logits that differ from eager ones by
                # ~1e-6 move the log10 of a KL near 1e-5 by ~1e-4 (seen on one machine's kernels)
                np.testing.assert_allclose(got, [kls.mean(), kls.max(), kls.min(), flips], rtol=0, atol=1e-3)


def test_margin_features_follow_their_definition(lenet, val_slice):
    x = val_slice[0][:3]
    feats = fisher_features(lenet.module, x, "spectral+noise").matrix
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        z = lenet.module(xi)[0]
        first, second = z.topk(2).indices.tolist()
        (grad,) = torch.autograd.grad(z[first] - z[second], xi)
        gap, norm = float((z[first] - z[second]).detach()), float(grad.norm())
        distance = gap / norm
        np.testing.assert_allclose(feats[i, [_column("margin_logit_gap"), _column("margin_log10_grad_norm"),
                                             _column("margin_log10_distance")]],
                                   [gap, np.log10(norm), np.log10(distance)], rtol=1e-4)
        with torch.no_grad():
            p = torch.softmax(z.detach().double(), -1)
            for c in MARGIN_STEPS:
                q = torch.softmax(lenet.module((xi - c * distance * grad / norm).clamp(0, 1)).double(), -1)[0]
                np.testing.assert_allclose(feats[i, _column(f"margin{c}d_log10_kl")], _log10_kl(p, q), atol=1e-3)
                assert feats[i, _column(f"margin{c}d_flips")] == float(q.argmax() != p.argmax())


def test_ratio_features_follow_their_definition(lenet, val_slice):
    x = val_slice[0][:4]
    noise = fisher_features(lenet.module, x, "spectral+noise").matrix
    feats = fisher_features(lenet.module, x, "spectral+noise+ratios")
    names = feats.names
    np.testing.assert_allclose(feats.matrix[:, :noise.shape[1]], noise, rtol=1e-6, atol=1e-9)
    col = lambda name: feats.matrix[:, names.index(name)]  # noqa: E731
    lam = feats.spectrum.eigenvalues.numpy()
    trace = lam.sum(1)
    share = lam / trace[:, None]
    np.testing.assert_allclose(col("log10_lambda1_over_lambda2"), np.log10(lam[:, 0] / lam[:, 1]), rtol=1e-6)
    np.testing.assert_allclose(col("log10_lambda2_over_lambda3"), np.log10(lam[:, 1] / lam[:, 2]), rtol=1e-6)
    np.testing.assert_allclose(col("log10_trace"), np.log10(trace), rtol=1e-9)
    entropy = -np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0), 1)
    np.testing.assert_allclose(col("effective_rank"), np.exp(entropy), rtol=1e-9)
    assert ((col("effective_rank") >= 1) & (col("effective_rank") <= 9)).all()  # rank <= K - 1
    for t in KL_STEPS:
        np.testing.assert_allclose(col(f"step{t}_log10_kl_over_quadratic"),
                                   col(f"step{t}_max_log10_kl") - np.log10(t * t * lam[:, 0] / 2), rtol=1e-9)
    for r in NOISE_NORMS:
        np.testing.assert_allclose(col(f"noise{r}_log10_kl_over_quadratic"),
                                   col(f"noise{r}_mean_log10_kl") - np.log10(r * r * trace / (2 * 784)), rtol=1e-9)
    np.testing.assert_allclose(col("margin_log10_lambda1_d2"),
                               np.log10(lam[:, 0]) + 2 * col("margin_log10_distance"), rtol=1e-6, atol=1e-9)


def test_fine_and_squeeze_directions_follow_their_definition(val_slice):
    x = val_slice[0][:3]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    u = torch.nn.functional.conv2d(padded, torch.ones(1, 1, 3, 3) / 9) - x  # 3x3 box mean minus the image
    torch.testing.assert_close(fine_direction(x), u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="N, C, H, W"):
        fine_direction(x.flatten(1))
    for level in (0.3, 0.7):
        w = torch.where(x >= level, 1.0, 0.0) - x  # 1-bit squeezing minus the image
        torch.testing.assert_close(squeeze_direction(x, level), w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    binary = (x > 0.5).float()  # already squeezed: no direction, no NaN
    assert torch.equal(squeeze_direction(binary, 0.5), torch.zeros_like(binary))


def test_sharpness_features_follow_their_definition(lenet, val_slice):
    from scipy.ndimage import uniform_filter

    from service.evaluate.shifts import gaussian_blur

    x = val_slice[0][:4]
    feats = fisher_features(lenet.module, x, "spectral+noise+fine+squeeze+sharpness")
    squeeze = fisher_features(lenet.module, x, "spectral+noise+fine+squeeze").matrix
    np.testing.assert_allclose(feats.matrix[:, :squeeze.shape[1]], squeeze, rtol=1e-6, atol=1e-9)
    for i in range(4):
        padded = np.pad(x[i, 0].double().numpy(), ((0, 1), (0, 1)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (2, 2)).reshape(28, 28, 4)
        image = np.sort(windows, -1)[..., 1]  # the 2x2 median, lower middle of four
        once = uniform_filter(image, size=3, mode="nearest")  # the 3x3 box mean, edges replicated
        twice = uniform_filter(once, size=3, mode="nearest")
        centred = ((image - image.mean()) ** 2).sum()
        for name, smooth in (("fine_log10_energy_share", once), ("coarse_log10_energy_share", twice)):
            np.testing.assert_allclose(feats.matrix[i, feats.names.index(name)],
                                       np.log10(((image - smooth) ** 2).sum() / centred), rtol=1e-9)
    # what the block is for: blur lowers both shares, a brightness factor leaves them
    blurred = fisher_features(lenet.module, gaussian_blur(x, 1.0), "spectral+noise+fine+squeeze+sharpness")
    darker = fisher_features(lenet.module, x * 0.8, "spectral+noise+fine+squeeze+sharpness")
    assert (blurred.matrix[:, -2:] < feats.matrix[:, -2:] - 0.3).all()
    np.testing.assert_allclose(darker.matrix[:, -2:], feats.matrix[:, -2:], rtol=1e-6)


def test_the_lean_set_is_the_full_sets_columns_without_its_probes(lenet, val_slice):
    x = val_slice[0][:4]
    full = fisher_features(lenet.module, x, "spectral+noise+fine+squeeze+sharpness")
    lean = fisher_features(lenet.module, x, "eigen+fine+squeeze+sharpness")
    assert set(lean.names) < set(full.names)
    assert not any(name.startswith(("step", "noise", "margin")) for name in lean.names)
    for i, name in enumerate(lean.names):
        # float32 probe passes of another batch composition: the KLs agree to ~1e-5 relative
        np.testing.assert_allclose(lean.matrix[:, i], full.matrix[:, full.names.index(name)], rtol=1e-4, atol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize(("head", "step", "direction", "steps"), [
    ("fine", "fine", fine_direction, FINE_STEPS),
    *[(f"squeeze{level}", f"squeeze{level}_step", lambda x, level=level: squeeze_direction(x, level), SQUEEZE_STEPS)
      for level in SQUEEZE_LEVELS],
])
def test_direction_features_follow_their_definition(lenet, val_slice, head, step, direction, steps):
    x = val_slice[0][:3]
    feats = fisher_features(lenet.module, x, "spectral+noise+fine+squeeze")
    col = lambda name: feats.matrix[:, feats.names.index(name)]  # noqa: E731
    ratios = fisher_features(lenet.module, x, "spectral+noise+ratios").matrix
    np.testing.assert_allclose(feats.matrix[:, :ratios.shape[1]], ratios, rtol=1e-6, atol=1e-9)
    u = direction(x)
    for i in range(3):
        g = dense_fisher(lenet.module, x[i])[0]  # float64 G_x from the full Jacobian
        ui = u[i].flatten().double()
        np.testing.assert_allclose(col(f"{head}_log10_rayleigh")[i], np.log10(float(ui @ g @ ui)), atol=2e-3)
        v = feats.spectrum.eigenvectors[i, :3].flatten(1).double()
        np.testing.assert_allclose(col(f"{head}_top3_share")[i], float(((v @ ui) ** 2).sum()), atol=1e-4)
        with torch.no_grad():
            p = torch.softmax(lenet.module(x[i:i + 1]).double(), -1)[0]
            for t in steps:
                q = torch.softmax(lenet.module((x[i] + t * u[i]).clamp(0, 1)[None]).double(), -1)[0]
                # the features' probes run on the frozen twin: float32 rounding moves a small KL's log a little
                np.testing.assert_allclose(col(f"{step}{t}_log10_kl")[i], _log10_kl(p, q), atol=0.01)
                quadratic = np.log10(t * t * float(ui @ g @ ui) / 2)
                np.testing.assert_allclose(col(f"{step}{t}_log10_kl_over_quadratic")[i], _log10_kl(p, q) - quadratic,
                                           atol=0.02)
                assert col(f"{step}{t}_flips")[i] == float(q.argmax() != p.argmax())


def test_features_of_an_image_do_not_depend_on_its_batch(lenet, val_slice):
    x = val_slice[0][:5]
    together = fisher_features(lenet.module, x, "spectral+noise").matrix
    alone = np.concatenate([fisher_features(lenet.module, x[i:i + 1], "spectral+noise").matrix for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)


def test_detection_set_filters_and_labels(lenet, val_slice, detection):
    x, y = val_slice
    with torch.no_grad():
        correct = (lenet.module(x).argmax(-1) == y).numpy()
    assert set(detection.source) <= set(np.flatnonzero(correct))
    assert detection.info["correctly_classified"] == int(correct.sum())
    for attack, c in detection.counts().items():
        assert c["clean"] == c["noisy"] == c["adversarial"] > 0, attack
        rows = detection.attack == attack
        adv, clean, noisy = (rows & (detection.kind == k) for k in ("adversarial", "clean", "noisy"))
        assert detection.is_adversarial[adv].all() and not detection.is_adversarial[clean | noisy].any()
        with torch.no_grad():
            pred = lenet.module(detection.images[torch.from_numpy(adv)]).argmax(-1).numpy()
        assert (pred != detection.label[adv]).all()  # only successful attacks
        assert torch.equal(detection.images[torch.from_numpy(clean)], x[detection.source[clean]])
        np.testing.assert_allclose(detection.perturbation_norm[noisy], detection.perturbation_norm[adv], rtol=1e-3)
        # the same source images, in the same order, in each kind
        assert (detection.source[clean] == detection.source[adv]).all()


def test_detection_set_is_deterministic(lenet, val_slice, detection):
    again = build_detection_set(lenet.module, *val_slice, attacks=ATTACKS, epsilons={"fgm": 4.0, "ossa": 4.0}, seed=3)
    assert torch.equal(again.images, detection.images)


def test_threshold_at_fpr():
    neg = np.arange(100) / 100.0
    t = threshold_at_fpr(neg, 0.05)
    assert np.mean(neg >= t) <= 0.05 and np.mean(neg >= 0.94) > 0.05
    assert np.mean(np.ones(10) >= threshold_at_fpr(np.ones(10), 0.05)) == 0.0


def test_detector_trains_scores_and_holds_its_fpr(lenet, detector):
    x, _ = load_mnist("test")
    result = detector.score(lenet.module, x[:10])
    assert result.scores.shape == (10,) and ((result.scores >= 0) & (result.scores <= 1)).all()
    assert (result.adversarial == (result.scores >= detector.threshold)).all()
    assert result.eigenvalues.shape == (10, 20) and result.probabilities.shape == (10, 10)
    card = detector.card
    assert card["model"] == {"name": "lenet5", "sha256": lenet.sha256, "input_shape": [1, 28, 28], "num_classes": 10}
    assert card["threshold"]["clean_fpr"] <= 0.05  # on the clean images that set it
    assert 0.0 <= card["test"]["auc"] <= 1.0 and card["features"]["feature_set"] == "spectral"


def test_save_load_round_trip_and_refusals(lenet, detector, tmp_path):
    path, card = save_detector(detector, detector_path(tmp_path, "lenet5"))
    assert path.name == "lenet5.detector.npz" and card == card_path_for(path) and card.name == "lenet5.detector.json"
    assert json.loads(card.read_text())["threshold"]["value"] == detector.threshold
    loaded = load_detector(path, lenet.sha256)
    assert loaded.card == detector.card and (loaded.feature_set, loaded.k) == (detector.feature_set, detector.k)
    x, _ = load_mnist("test")
    np.testing.assert_array_equal(loaded.score(lenet.module, x[:8]).scores, detector.score(lenet.module, x[:8]).scores)
    with pytest.raises(DetectorLoadError, match="sha256"):
        load_detector(path, "0" * 64)
    with pytest.raises(DetectorLoadError, match="not found"):
        load_detector(tmp_path / "missing.detector.npz", lenet.sha256)
    card.unlink()
    with pytest.raises(DetectorLoadError, match="card .* not found"):
        load_detector(path, lenet.sha256)


def test_kd_and_bu_give_finite_scores(lenet, detection):
    xt, yt = load_mnist("train")
    kd = KernelDensityScorer.fit(lenet.module, xt[:300], yt[:300])
    assert kd.bandwidth > 0
    kd_scores = kd.score(lenet.module, detection.images[:30])
    bu = bayesian_uncertainty(lenet.module, detection.images[:30], samples=10)
    assert np.isfinite(kd_scores).all() and np.isfinite(bu).all() and (bu >= -1e-12).all()


def test_shipped_detector_matches_shipped_model(lenet):
    path = detector_path(lenet.card_path.parent, "lenet5")
    assert path.is_file(), f"the shipped detector {path} is missing"
    detector = load_detector(path, lenet.sha256)
    assert detector.card["test"]["auc"] > 0.8


@pytest.mark.slow
def test_evaluate_quick_writes_report(tmp_path):
    out = tmp_path / "mnist"
    subprocess.run([sys.executable, "-m", "service.cli", "evaluate", "--quick", "--out", str(out)], check=True,
                   capture_output=True)
    report = (out / "report.md").read_text()
    for heading in ("## Protocol", "## Table 2", "## Table 3", "## Table 4", "## Table 5", "## Against the paper"):
        assert heading in report
    for png in ("fig2a_fooling_rate.png", "fig3_least_norm_vs_eigenvalue.png", "fig4a_top_eigenvalue_hist.png",
                "roc_curves.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert "table4" in json.loads((out / "results.json").read_text())
