"""Attacks in pixel space [0, 1] with L2 budgets, over (model, images, labels) like torchattacks; the table of
attack specs (`ATTACK_SPECS`) is how the rest of the service names, checks and calls them."""

from service.attacks.common import AttackResult
from service.attacks.cw import cw_l2
from service.attacks.gradient import bim, fgm, otcm
from service.attacks.least_norm import LeastNormResult, direction_attack, least_norm, least_norm_search
from service.attacks.ossa import iterative_ossa, ossa
from service.attacks.specs import ATTACK_NAMES, ATTACK_SPECS, AttackSpec, attack_spec, check_steps

__all__ = ["ATTACK_NAMES", "ATTACK_SPECS", "AttackResult", "AttackSpec", "LeastNormResult", "attack_spec", "bim",
           "check_steps", "cw_l2", "direction_attack", "fgm", "iterative_ossa", "least_norm", "least_norm_search",
           "ossa", "otcm"]
