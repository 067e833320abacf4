"""Attacks in pixel space [0, 1] with L2 budgets, over (model, images, labels) like torchattacks."""

from service.attacks.common import AttackResult
from service.attacks.cw import cw_l2
from service.attacks.gradient import bim, fgm, otcm
from service.attacks.least_norm import LeastNormResult, least_norm_search
from service.attacks.ossa import iterative_ossa, ossa

ATTACKS = {"ossa": ossa, "iterative-ossa": iterative_ossa, "fgm": fgm, "otcm": otcm, "bim": bim, "opt": cw_l2}

__all__ = ["ATTACKS", "AttackResult", "LeastNormResult", "bim", "cw_l2", "fgm", "iterative_ossa",
           "least_norm_search", "ossa", "otcm"]
