"""td-ray: Translate-Distill on Ray."""

__version__ = "0.1.0"
