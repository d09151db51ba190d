"""Controls that rule out explanations of transfer other than subliminal learning (issue 13): the
in-context-learning control (icl.py)."""
