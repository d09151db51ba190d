"""Sweeps: config and expansion (config.py), the local executor (local.py), the Ray executor (ray_executor.py)."""
