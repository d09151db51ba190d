"""sublab: subliminal learning experiments end to end (see README.md for the file map)."""

__version__ = "0.1.0"
