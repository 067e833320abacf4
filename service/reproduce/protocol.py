"""The paper's MNIST reproduction: its protocol (what is measured, on which split, with which budgets rule), the
paper's own figures that the report compares against, and the run's configuration.

Budgets are chosen on the validation split, everything reported is measured on the held-out test split;
detectors are fitted on the validation split's detection set and tested on the test split's. Only correctly
classified clean images are attacked; only successful adversarial images count as positives. All randomness is
seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.attacks import ATTACK_SPECS
from service.detect.dataset import DEFAULT_ATTACKS
from service.detect.features import SHIPPED_FEATURE_SET

PAPER_TABLE4 = {"fgm": 96.11, "otcm": 98.47, "opt": 95.67, "bim": 99.10, "ossa": 93.13}
PAPER_KDBU = {"fgm": 82.43, "otcm": 95.78, "opt": 95.35, "bim": 98.81, "ossa": 85.97}
PAPER_TABLE2 = {"fgm": (2.11, 94.98), "ossa": (1.80, 95.68)}
PAPER_TABLE3 = {"lenet5": [100.0, 62.02, 88.49, 82.20], "vgg-shallow": [53.64, 100.0, 76.93, 74.45],
                "lenet5-adv": [27.92, 17.83, 100.0, 90.04], "vgg-shallow-adv": [15.06, 29.24, 94.15, 100.0]}
PAPER_TABLE5 = {"fgm": [94.31, 91.92, 90.78, 91.87, 92.13], "otcm": [98.55, 98.96, 98.26, 97.78, 98.57],
                "opt": [95.18, 95.30, 96.90, 97.15, 96.11], "bim": [98.10, 96.00, 97.09, 98.57, 96.35],
                "ossa": [91.17, 91.47, 89.77, 89.47, 89.67]}
ATTACK_TITLES = {name: ATTACK_SPECS[name].title for name in DEFAULT_ATTACKS}
MODELS = ("lenet5", "vgg-shallow", "lenet5-adv", "vgg-shallow-adv")
EPS_GRID = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SELECT_RATE = 0.80  # the budget rule: smallest grid epsilon whose validation fooling rate reaches this
TABLE3_EPSILON = 2.0
FEATURE_SETS_COMPARED = ("plain", "plain+probs", "spectral", "spectral+noise", "spectral+noise+ratios",
                         "spectral+noise+fine", "spectral+noise+fine+squeeze")


@dataclass
class EvalConfig:
    """Sizes and seeds of one run; `quick` is a small slice for the tests."""

    out: Path
    quick: bool = False
    seed: int = 0
    detector_model: str = "lenet5"
    n_detect: int = 1000  # images per split (val: fit, test: test) for the detection tables
    n_select: int = 500  # validation images for the budget selection
    n_table2: int = 1000  # test images per model for Table 2 (LeNet); VGG uses n_table2_vgg
    n_table2_vgg: int = 300
    n_table3: int = 500
    n_fig3: int = 800
    n_kd_train: int = 3000  # training images for the KD densities
    opt_steps: int = 100
    feature_sets: tuple[str, ...] = FEATURE_SETS_COMPARED
    ours: str = SHIPPED_FEATURE_SET
    command: str = ""
    robustness: Path | None = None  # an `evaluate-detector` results.json whose envelope the report adds
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def make(cls, out: Path, quick: bool = False, **kw) -> EvalConfig:
        if quick:
            kw = {"n_detect": 30, "n_select": 20, "n_table2": 30, "n_table2_vgg": 8, "n_table3": 16, "n_fig3": 30,
                  "n_kd_train": 300, "opt_steps": 30, **kw}
        return cls(out=Path(out), quick=quick, **kw)


