"""The spectrum of the input-space Fisher information G_x: pure torch, no I/O."""

from service.fisher.dense import dense_fisher, dense_spectrum, fisher_by_class_sum
from service.fisher.result import FisherSpectrum
from service.fisher.spectrum import METHODS, choose_method, fisher_spectrum

__all__ = ["FisherSpectrum", "METHODS", "choose_method", "dense_fisher", "dense_spectrum", "fisher_by_class_sum",
           "fisher_spectrum"]
