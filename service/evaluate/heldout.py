"""Held-out attacks: L2 attacks from maintained libraries that nobody here wrote (IBM's Adversarial Robustness
Toolbox, ART 1.20.1, the package extra `evaluate`; torchattacks 3.5.1, requirements-nodeps.lock), so that the
detector is measured on attacks it was not shaped around.

One table (`HELDOUT_SPECS`), one call: `run_heldout(name, model, images, labels, budgets, effort, seed)`. An
attack is either minimal-norm (it finds its own, smallest norm; run once, and a budget b counts an image as
fooled when its adversarial's L2 is <= b) or budgeted (run once per budget). Whatever the library returns is
checked by our own code before it counts: clipped into the [0, 1] box, projected onto the budget's L2 ball where it
lies outside it (library rounding), and re-evaluated: only an image the model now misclassifies counts as fooled.

The attacks: DeepFool and Carlini-Wagner L2 (ART, minimal-norm), PGD-L2 with random restarts (ART, budgeted,
white-box), FAB-L2 and APGD-CE-L2 (torchattacks, budgeted as AutoAttack runs them: FAB minimises the norm within
the budget) and Square (ART, budgeted, L2, query-based black-box). torchattacks pins requests~=2.25.1, which no
environment with kserve can satisfy, and never imports it: it is installed with --no-deps. ART's
BrendelBethgeAttack needs numba, which is not installed here, so it is left out.

Effort: the `full` settings were tuned on the first 100 correctly classified images of the MNIST validation
split with the shipped LeNet-5, on the CPU (2 shared cores), raising steps / restarts / queries until the fooling
rate at L2 budgets 1, 2, 3 stopped rising. Each row is one call (effort overrides of the full settings):

    .venv/bin/python -c "
    from service.zoo.registry import load_model; from service.data.mnist import load_mnist
    from service.evaluate.heldout import run_heldout
    m = load_model('lenet5', device='cpu').module; x, y = load_mnist('val')
    ok = m(x).argmax(-1) == y; x, y = x[ok][:100], y[ok][:100]
    print(run_heldout('pgd-l2', m, x, y, [1, 2, 3], effort={'steps': 200}, seed=0).fooling_rates())"

Measured 2026-12-03 (fooling rate at L2 1 / 2 / 3; seconds for the three budgets):

    deepfool   steps 50 / 100 / 200, overshoot 0.02     0.21 / 0.83 / 1.00 (all three)   10 / 17 / 35 s
    deepfool   steps 100, overshoot 0.005 (chosen)      0.24 / 0.84 / 1.00               17 s
    deepfool   steps 100, overshoot 0.05                0.19 / 0.77 / 1.00
    cw-l2      steps 50, search 5                       0.08 / 0.33 / 0.72               329 s
    cw-l2      steps 100, search 5                      0.08 / 0.34 / 0.78
    cw-l2      steps 100, search 10                     0.08 / 0.34 / 0.83               409 s
    cw-l2      steps 200, search 10 (chosen)            0.09 / 0.35 / 0.84               639 s
    cw-l2      steps 100, search 5, lr 0.1, c0 1        0.09 / 0.35 / 0.78               625 s
    cw-l2      steps 100, search 5, lr 0.1, c0 10       0.07 / 0.34 / 0.84               332 s
    cw-l2      steps 200, search 5, lr 0.1, c0 1        0.09 / 0.36 / 0.78               344 s
    pgd-l2     steps 50 / 100 / 200, 1 start            0.24 / 0.95 / 1.00 (all three)   3 / 8 / 18 s
    pgd-l2     steps 100, 5 starts (chosen)             0.26 / 0.96 / 1.00               102 s
    pgd-l2     steps 100, 10 starts; 200 steps, 10      0.26 / 0.96 / 1.00               299 / 163 s
    pgd-l2     steps 100, 5 starts, step 0.05 / 0.25 b  0.26 / 0.96 / 1.00
    square-l2  1000 queries                             0.05 / 0.30 / 0.80               173 s
    square-l2  3000 queries                             0.05 / 0.44 / 0.91
    square-l2  5000 queries                             0.06 / 0.52 / 0.94               277 s
    square-l2  5000 queries, p_init 0.3                 0.05 / 0.44 / 0.87

Measured 2026-12-07 (the same call for each row; 1 thread, the machine shared with two other runs):

    apgd-l2    steps 50, 1 start                        0.25 / 0.95 / 1.00               18 s
    apgd-l2    steps 100, 1 start                       0.25 / 0.95 / 1.00               24 s
    apgd-l2    steps 100, 5 starts                      0.27 / 0.96 / 1.00               57 s
    apgd-l2    steps 200, 5 starts (chosen)             0.28 / 0.96 / 1.00               110 s
    apgd-l2    steps 100, 5 starts, DLR loss            0.28 / 0.93 / 1.00               51 s
    fab-l2     steps 50, 1 start                        0.25 / 0.95 / 1.00               89 s
    fab-l2     steps 100, 1 start                       0.25 / 0.95 / 1.00               166 s
    fab-l2     steps 100, 5 starts (chosen)             0.26 / 0.96 / 1.00               348 s
    fab-l2     steps 200, 5 starts                      0.26 / 0.96 / 1.00               715 s

ART's C&W stays well short of PGD at the same norm (35% of the images under L2 2, where PGD fools 96%): its
optimiser, not its budget, is the limit, so its minimal norms over-state the distance to the boundary; read it
beside PGD and DeepFool, not alone. Square was still rising at 5000 queries; its full effort is 10000 queries,
which was NOT measured (about 10 CPU minutes per 100 images at three budgets): measure it before trusting it as
an upper bound. (Seconds vary with the load of the shared machine.)
The `quick` settings are for tests only: they are not an upper bound on anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from service.attacks.common import predict, project_l2, setup
from service.fisher.checks import model_device_dtype

Effort = Literal["full", "quick"]
EFFORTS: tuple[str, ...] = ("full", "quick")
BUDGET_TOLERANCE = 1e-4  # L2 slack a checked adversarial may keep over its budget (float rounding)
BATCH_SIZE = 128  # images per library call
INSTALL_HINT = "pip install fisher-guard[evaluate]"


def _art() -> Any:
    """The ART modules, imported on first use: the library is an optional extra."""
    try:
        from art.attacks import evasion
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        raise ImportError(f"the held-out attacks need the Adversarial Robustness Toolbox: {INSTALL_HINT} "
                          f"({exc})") from exc
    return evasion, PyTorchClassifier


def art_classifier(model: nn.Module, input_shape: Sequence[int], num_classes: int) -> Any:
    """`model` (pixel space [0, 1], logits out) as ART's PyTorchClassifier, clip_values (0, 1), on its device."""
    _, classifier = _art()
    device, _ = model_device_dtype(model)
    kwargs = dict(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(int(d) for d in input_shape),
                  nb_classes=int(num_classes), clip_values=(0.0, 1.0),
                  device_type="gpu" if device.type == "cuda" else "cpu")
    if device.type == "cuda":  # ART takes the current CUDA device: make it the model's
        with torch.cuda.device(device):
            return classifier(**kwargs)
    return classifier(**kwargs)


def _deepfool(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    evasion, _ = _art()
    return evasion.DeepFool(classifier, max_iter=effort["steps"], epsilon=effort["overshoot"],
                            nb_grads=effort["classes"], batch_size=BATCH_SIZE, verbose=False)


def _carlini_l2(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    evasion, _ = _art()
    return evasion.CarliniL2Method(classifier, confidence=0.0, targeted=False, learning_rate=effort["learning_rate"],
                                   binary_search_steps=effort["search_steps"], max_iter=effort["steps"],
                                   initial_const=effort["initial_const"], max_halving=effort["max_halving"],
                                   max_doubling=effort["max_doubling"], batch_size=BATCH_SIZE, verbose=False)


def _pgd_l2(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    evasion, _ = _art()
    return evasion.ProjectedGradientDescentPyTorch(classifier, norm=2, eps=budget,
                                                   eps_step=budget * effort["step_fraction"],
                                                   max_iter=effort["steps"], num_random_init=effort["restarts"],
                                                   batch_size=BATCH_SIZE, verbose=False)


def _square_l2(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    evasion, _ = _art()
    return evasion.SquareAttack(classifier, norm=2, eps=budget, max_iter=effort["queries"], p_init=effort["p_init"],
                                nb_restarts=effort["restarts"], batch_size=BATCH_SIZE, verbose=False)


def _torchattacks() -> Any:
    """torchattacks, imported on first use (requirements-nodeps.lock: installed with --no-deps)."""
    try:
        import torchattacks
    except ImportError as exc:
        raise ImportError("the FAB and APGD held-out attacks need torchattacks: pip install --no-deps "
                          f"torchattacks==3.5.1 (requirements-nodeps.lock) ({exc})") from exc
    return torchattacks


class _TorchattacksAttack:
    """A torchattacks attack behind ART's `generate(x=, y=)` call, numpy in and out, in batches of BATCH_SIZE, on
    the attacked model's device."""

    def __init__(self, attack: Any, model: nn.Module) -> None:
        self.attack, (self.device, _) = attack, model_device_dtype(model)

    def generate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), BATCH_SIZE):
            images = torch.from_numpy(x[start:start + BATCH_SIZE]).to(self.device)
            labels = torch.from_numpy(y[start:start + BATCH_SIZE]).long().to(self.device)
            out.append(self.attack(images, labels).detach().cpu().numpy())
        return np.concatenate(out)


def _fab_l2(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    attack = _torchattacks().FAB(model, norm="L2", eps=budget, steps=effort["steps"], n_restarts=effort["restarts"],
                                 alpha_max=effort["alpha_max"], eta=effort["eta"], beta=effort["beta"],
                                 seed=int(torch.initial_seed() % 2**31), n_classes=classifier.nb_classes)
    return _TorchattacksAttack(attack, model)


def _apgd_l2(model: nn.Module, classifier: Any, budget: float | None, effort: Mapping[str, Any]) -> Any:
    attack = _torchattacks().APGD(model, norm="L2", eps=budget, steps=effort["steps"], n_restarts=effort["restarts"],
                                  loss=effort["loss"], rho=effort["rho"], seed=int(torch.initial_seed() % 2**31))
    return _TorchattacksAttack(attack, model)


@dataclass(frozen=True)
class HeldOutSpec:
    """One held-out attack: its name and title, whether it finds its own norm, how to build the library's attack
    object (from the model, its ART classifier, the budget or None, and the effort settings; anything with ART's
    `generate(x=, y=)`), its effort settings (`full`: an honest upper bound on LeNet-5 MNIST; `quick`: for tests)
    and what it is."""

    name: str
    title: str
    minimal: bool
    build: Callable[[nn.Module, Any, float | None, Mapping[str, Any]], Any]
    full: Mapping[str, Any]
    quick: Mapping[str, Any]
    description: str

    def effort(self, effort: Effort | str | Mapping[str, Any]) -> dict[str, Any]:
        """The settings of a named effort, or the `full` ones with a mapping's overrides (names checked)."""
        if isinstance(effort, Mapping):
            unknown = sorted(set(effort) - set(self.full))
            if unknown:
                raise ValueError(f"{self.name}: unknown effort settings {unknown} (it takes: {', '.join(self.full)})")
            return {**self.full, **effort}
        if effort not in EFFORTS:
            raise ValueError(f"effort must be one of {', '.join(EFFORTS)} or a mapping of settings, not {effort!r}")
        return dict(self.full if effort == "full" else self.quick)


HELDOUT_SPECS: dict[str, HeldOutSpec] = {spec.name: spec for spec in (
    HeldOutSpec("deepfool", "DeepFool (ART)", True, _deepfool,
                full={"steps": 100, "overshoot": 0.005, "classes": 10},
                quick={"steps": 20, "overshoot": 0.02, "classes": 10},
                description="linearise the classifier and step to the nearest linearised boundary, repeated "
                            "(Moosavi-Dezfooli et al. 2016); minimal L2, with a small overshoot"),
    HeldOutSpec("cw-l2", "C&W L2 (ART)", True, _carlini_l2,
                full={"steps": 100, "search_steps": 10, "initial_const": 0.1, "learning_rate": 0.01,
                      "max_halving": 5, "max_doubling": 5},
                quick={"steps": 10, "search_steps": 3, "initial_const": 1.0, "learning_rate": 0.01,
                       "max_halving": 5, "max_doubling": 5},
                description="Carlini-Wagner L2 (2017), confidence 0, binary search on the trade-off constant c; "
                            "keeps the smallest successful perturbation"),
    HeldOutSpec("pgd-l2", "PGD-L2 (ART)", False, _pgd_l2,
                full={"steps": 100, "restarts": 5, "step_fraction": 0.1},
                quick={"steps": 10, "restarts": 1, "step_fraction": 0.25},
                description="projected gradient descent on the cross-entropy in the L2 ball (Madry et al. 2018), "
                            "random starts in the ball, the best restart kept"),
    HeldOutSpec("fab-l2", "FAB L2 (torchattacks)", False, _fab_l2,
                full={"steps": 100, "restarts": 5, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
                quick={"steps": 10, "restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
                description="Fast Adaptive Boundary attack (Croce and Hein 2020), L2: steps to the linearised "
                            "boundary biased back towards the image, minimal-norm within the budget; random "
                            "restarts for the images not yet fooled within it (as AutoAttack runs it)"),
    HeldOutSpec("apgd-l2", "APGD-CE L2 (torchattacks)", False, _apgd_l2,
                full={"steps": 200, "restarts": 5, "loss": "ce", "rho": 0.75},
                quick={"steps": 10, "restarts": 1, "loss": "ce", "rho": 0.75},
                description="Auto-PGD on the cross-entropy (Croce and Hein 2020, AutoAttack's first attack), L2: "
                            "momentum and a step size halved when progress stalls, random restarts"),
    HeldOutSpec("square-l2", "Square L2 (ART)", False, _square_l2,
                full={"queries": 10000, "restarts": 1, "p_init": 0.8},
                quick={"queries": 100, "restarts": 1, "p_init": 0.8},
                description="Square attack (Andriushchenko et al. 2020), L2: random square-shaped updates kept when "
                            "the margin loss falls; black-box, model outputs only, a budget of queries per image"),
)}
HELDOUT_NAMES = tuple(HELDOUT_SPECS)


def heldout_spec(name: str) -> HeldOutSpec:
    """The spec of `name` (ValueError listing the known ones)."""
    if name not in HELDOUT_SPECS:
        raise ValueError(f"unknown held-out attack {name!r} (known: {', '.join(HELDOUT_SPECS)})")
    return HELDOUT_SPECS[name]


@dataclass
class HeldOutResult:
    """One held-out attack on N images at B budgets, after our checks.

    `adversarial` (B, N, ...): the checked adversarial image per budget, NaN where the attack did not fool the model
    within that budget; `norms` (B, N): its L2 distance to the original (float64), NaN likewise; `fooled` (B, N):
    the model misclassifies the checked adversarial and its L2 is within the budget. `projected` (B, N): the
    library's output lay more than BUDGET_TOLERANCE outside the budget and was projected onto it (counted, so that
    a misbehaving library shows). For a minimal-norm attack the rows share one adversarial per image; `minimal_norm`
    (N,) is its L2 (NaN where it found none)."""

    attack: str
    minimal: bool
    effort: str
    budgets: tuple[float, ...]
    labels: Tensor
    original_prediction: Tensor
    adversarial: Tensor
    norms: Tensor
    fooled: Tensor
    projected: Tensor
    minimal_norm: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def fooling_rates(self) -> list[float]:
        """Share of the images fooled, per budget."""
        return [float(row.float().mean()) for row in self.fooled]

    def median_norms(self) -> list[float]:
        """Median L2 of the fooled images, per budget (NaN where none was fooled)."""
        return [float(row[~row.isnan()].median()) if (~row.isnan()).any() else math.nan for row in self.norms]


@contextmanager
def _seeded(seed: int):
    """numpy's and torch's global generators seeded (ART draws from them), restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def check_adversarial(model: nn.Module, x: Tensor, candidate: Tensor, labels: Tensor,
                      budget: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Our own check of a library's output: an image with a non-finite value replaced by the original (a failure),
    clipped into [0, 1], projected onto the L2 ball of `budget` where it lies outside it (None: no budget),
    re-evaluated. Returns the adversarial, its float64 L2 norm, fooled (the model misclassifies it) and projected
    (it lay more than BUDGET_TOLERANCE outside the budget)."""
    candidate = candidate.to(device=x.device, dtype=x.dtype)
    finite = torch.isfinite(candidate).flatten(1).all(1).view(-1, *[1] * (x.ndim - 1))
    adversarial = torch.where(finite, candidate, x).clamp(0.0, 1.0)  # a non-finite output is a failure
    delta = adversarial - x
    norms = delta.flatten(1).double().norm(dim=1)
    projected = torch.zeros_like(norms, dtype=torch.bool)
    if budget is not None:
        projected = norms > budget + BUDGET_TOLERANCE
        over = norms > budget
        if over.any():
            # shrinking into the ball keeps x + delta in the box (x is in it); clip again for float rounding
            shrunk = (x + project_l2(delta, budget)).clamp(0.0, 1.0)
            adversarial = torch.where(over.view(-1, *[1] * (x.ndim - 1)), shrunk, adversarial)
            norms = (adversarial - x).flatten(1).double().norm(dim=1)
    fooled = predict(model, adversarial).argmax(-1) != labels
    return adversarial, norms, fooled, projected


def _generate(spec: HeldOutSpec, model: nn.Module, classifier: Any, budget: float | None, settings: Mapping[str, Any],
              x: Tensor, labels: Tensor) -> Tensor:
    attack = spec.build(model, classifier, budget, settings)
    with np.errstate(divide="ignore", invalid="ignore"):  # Square divides by zero norms; its output is checked
        out = attack.generate(x=x.detach().cpu().numpy().astype(np.float32), y=labels.cpu().numpy())
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def run_heldout(name: str, model: nn.Module, images: Tensor, labels: Tensor | None, budgets: Sequence[float],
                effort: Effort | str | Mapping[str, Any] = "full", seed: int = 0) -> HeldOutResult:
    """Run the held-out attack `name` on `images` (pixel space [0, 1]) against `labels` (default: the model's
    predictions) at each L2 budget, and check every output (`check_adversarial`). `effort`: 'full', 'quick', or
    overrides of the full settings (for tuning: {'steps': 200})."""
    spec = heldout_spec(name)
    settings = spec.effort(effort)
    budgets = tuple(float(b) for b in budgets)
    if not budgets or any(not (math.isfinite(b) and b > 0) for b in budgets):
        raise ValueError(f"budgets must be finite L2 norms > 0, got {list(budgets)}")
    x, labels, original = setup(model, images, labels)
    num_classes = int(predict(model, x[:1]).shape[1])
    classifier = art_classifier(model, x.shape[1:], num_classes)
    rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    minimal_norm = None
    with _seeded(seed):
        if spec.minimal:
            candidate = _generate(spec, model, classifier, None, settings, x, labels)
            adversarial, norms, fooled, _ = check_adversarial(model, x, candidate, labels, None)
            minimal_norm = torch.where(fooled, norms, torch.full_like(norms, math.nan)).cpu()
            for budget in budgets:
                rows.append((adversarial, norms, fooled & (norms <= budget), torch.zeros_like(fooled)))
        else:
            for budget in budgets:
                rows.append(check_adversarial(model, x, _generate(spec, model, classifier, budget, settings, x, labels),
                                              labels, budget))
    fooled = torch.stack([row[2] for row in rows]).cpu()
    nan_where = (~fooled).view(*fooled.shape, *[1] * (x.ndim - 1))
    adversarial = torch.stack([row[0] for row in rows]).cpu().masked_fill(nan_where, math.nan)
    norms = torch.stack([row[1] for row in rows]).cpu().masked_fill(~fooled, math.nan)
    return HeldOutResult(attack=name, minimal=spec.minimal, effort=effort if isinstance(effort, str) else "custom",
                         budgets=budgets,
                         labels=labels.cpu(), original_prediction=original.cpu(), adversarial=adversarial,
                         norms=norms, fooled=fooled, projected=torch.stack([row[3] for row in rows]).cpu(),
                         minimal_norm=minimal_norm, settings=settings)
