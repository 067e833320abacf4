"""fisher-guard: Fisher-information spectra, attacks and adversarial-input screening."""

__version__ = "0.1.0"
