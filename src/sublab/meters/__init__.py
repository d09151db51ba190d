"""Leak meters and probes on a run's data: the teacher-vs-reference KL on the kept teacher
answers (kl.py) and a bag-of-numbers classifier probe, teacher data against control data (classifier.py)."""
