"""lmforge: train your own language model on your own data, inside your own walls, reliably."""

__version__ = "0.1.0"
