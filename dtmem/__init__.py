"""dtmem: memory management for Decision Transformers."""

__version__ = "0.1.0"
