"""Reports of detectors: the plotting primitives and Markdown helpers shared by the MNIST reproduction
(service.reproduce.report) and a user's detector report (detector_report)."""
