"""The detector evaluation (`evaluate-detector`): held-out library attacks, adaptive attacks, benign shifts, the
feature-squeezing baseline, and the run that puts them in one report. This module stays torch-free: the CLI's
parser reads PARTS from it."""

PARTS = ("heldout", "adaptive", "shifts", "squeezing")
