"""The paper's MNIST reproduction: protocol.py (what and how), run.py (measures), report.py (writes)."""
