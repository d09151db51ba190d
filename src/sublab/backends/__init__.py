"""Model backends behind one small interface (base.py), chosen by spec string (registry.py)."""
