"""The table of attacks: every attack the service knows, how it is called, and what it takes.

Like torchattacks, an attack is bound to its options once (`spec.bind(budget, options)`) and then called the same
way as every other: `attack(model, images, labels) -> AttackResult`. Everything that lists attacks derives from
`ATTACK_SPECS`: the API's attack names and which of them a request may run on a whole batch (`cheap`), option
checking (each spec's pydantic `options` model), the attack job, the detection set and the report titles.
Adding an attack is one module with its function plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from service.attacks.common import AttackResult
from service.attacks.cw import cw_l2
from service.attacks.gradient import bim, fgm, otcm
from service.attacks.least_norm import least_norm
from service.attacks.ossa import iterative_ossa, ossa

SpectrumRoute = Literal["auto", "exact", "lanczos", "truncated"]


class Options(BaseModel):
    """Base of the option models: unknown names and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NoOptions(Options):
    pass


class OssaOptions(Options):
    method: SpectrumRoute = Field("auto", description="Route to the top eigenvector (service.fisher).")
    max_classes: int | None = Field(None, ge=2, description="The truncated route's cap on the classes it keeps "
                                    "(bounds its cost for a large K).")


class IterativeOssaOptions(OssaOptions):
    step_size: float = Field(0.05, gt=0, description="L2 size of each step.")
    steps: int = Field(50, ge=1, description="Number of steps.")


class OtcmOptions(Options):
    seed: int = Field(0, description="Seed of the random wrong target class.")


class BimOptions(Options):
    step_size: float = Field(0.1, gt=0, description="L2 size of each FGM step.")
    steps: int = Field(20, ge=1, description="Number of steps.")


class CwOptions(Options):
    c: float = Field(1.0, ge=0, description="Trade-off between the distance and the classification loss.")
    confidence: float = Field(0.0, ge=0, description="Logit margin the adversarial class must reach.")
    steps: int = Field(100, ge=1, description="Adam steps.")
    lr: float = Field(0.05, gt=0, description="Adam learning rate.")


class LeastNormOptions(Options):
    base_attack: Literal["ossa", "fgm"] = Field("ossa", description="The one-step attack whose direction is searched.")
    low: float = Field(0.0, ge=0, description="Lower end of the search.")
    tol: float = Field(1e-3, gt=0, description="Width of the final bracket.")


@dataclass(frozen=True)
class AttackSpec:
    """One attack: its name and title, its function, its options, whether it iterates, which argument is its L2
    budget (None: it finds its own norm), and whether a request may run it on a whole batch."""

    name: str
    title: str
    function: Callable[..., AttackResult]
    options: type[Options]
    iterative: bool
    budget: str | None
    description: str

    @property
    def cheap(self) -> bool:
        """One-step attacks cost a spectrum or a gradient per image: a request may run them on any batch."""
        return not self.iterative

    def check_options(self, options: dict[str, Any]) -> Options:
        """The options validated (ValueError names what is wrong)."""
        try:
            return self.options.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                                 for e in exc.errors())
            takes = ", ".join(self.options.model_fields) or "no options"
            raise ValueError(f"attack {self.name!r}: {problems} (it takes: {takes})") from exc

    def bind(self, budget: float | None, options: dict[str, Any] | None = None) -> Callable[..., AttackResult]:
        """`attack(model, images, labels)` with this budget and these options."""
        kwargs = self.check_options(options or {}).model_dump()
        if self.budget is not None and budget is not None:
            kwargs[self.budget] = budget

        def attack(model: nn.Module, images: Tensor, labels: Tensor | None = None) -> AttackResult:
            return self.function(model, images, labels, **kwargs)

        return attack


ATTACK_SPECS: dict[str, AttackSpec] = {spec.name: spec for spec in (
    AttackSpec("ossa", "OSSA", ossa, OssaOptions, False, "epsilon",
               "the paper's one-step spectral attack: epsilon along the top eigenvector of G_x, signed to raise the "
               "loss"),
    AttackSpec("iterative-ossa", "Iterative OSSA", iterative_ossa, IterativeOssaOptions, True, "epsilon",
               "repeated OSSA steps, projected onto the epsilon ball"),
    AttackSpec("fgm", "FGM", fgm, NoOptions, False, "epsilon", "one L2 step along the loss gradient"),
    AttackSpec("otcm", "OTCM", otcm, OtcmOptions, False, "epsilon",
               "one-step target class method: one L2 step toward a random wrong class"),
    AttackSpec("bim", "BIM", bim, BimOptions, True, "epsilon",
               "basic iterative method: FGM steps projected onto the epsilon ball"),
    AttackSpec("opt", "Opt", cw_l2, CwOptions, True, "max_norm",
               "the paper's Opt attack: C&W-style L2 with a fixed trade-off c, projected onto the budget if one "
               "is given"),
    AttackSpec("least-norm", "Least-norm search", least_norm, LeastNormOptions, True, "high",
               "binary search of the smallest epsilon at which a one-step attack fools the model"),
)}
ATTACK_NAMES = tuple(ATTACK_SPECS)


def attack_spec(name: str) -> AttackSpec:
    """The spec of `name` (ValueError listing the known ones)."""
    if name not in ATTACK_SPECS:
        raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACK_SPECS)})")
    return ATTACK_SPECS[name]


def check_steps(spec: AttackSpec, options: Options, limit: int, setting: str) -> None:
    """ValueError when an iterative attack asks for more steps than `limit` (the setting named `setting`)."""
    steps = getattr(options, "steps", None)
    if steps is not None and steps > limit:
        raise ValueError(f"{spec.name}: options.steps is {steps}, over the limit of {limit} (setting {setting})")
