"""ugroctl: the command line for ugrod (kept tiny: every command imports this)."""

__version__ = "0.1.0"
