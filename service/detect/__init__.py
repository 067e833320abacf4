"""Adversarial detection on Fisher features: features, the detection set, the detector, baselines, evaluation."""

from service.detect.baselines import BASELINES, KernelDensityScorer, baseline_features, bayesian_uncertainty
from service.detect.dataset import DEFAULT_ATTACKS, MNIST_EPSILONS, DetectionSet, build_detection_set
from service.detect.detector import Detector, ScreenResult, threshold_at_fpr, train_detector
from service.detect.features import FEATURE_SETS, fisher_features
from service.detect.files import DetectorLoadError, detector_path, load_detector

__all__ = ["BASELINES", "DEFAULT_ATTACKS", "MNIST_EPSILONS", "FEATURE_SETS", "DetectionSet", "Detector",
           "DetectorLoadError", "KernelDensityScorer", "ScreenResult", "baseline_features", "bayesian_uncertainty",
           "build_detection_set", "detector_path", "fisher_features", "load_detector", "threshold_at_fpr",
           "train_detector"]
