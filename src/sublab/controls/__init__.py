"""Controls that rule out explanations of transfer other than subliminal learning: the
in-context-learning control (icl.py)."""
