"""ugrod: the UGRO daemon."""

__version__ = "0.1.0"
