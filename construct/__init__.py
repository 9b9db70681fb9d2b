"""Construct: an end-to-end-encrypted messaging relay on Twisted."""

__version__ = "0.1.0"
