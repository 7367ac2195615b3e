"""ofa_lib: the helper package behind the ofa notebooks (see README.md)."""

__version__ = "0.1.0"
