"""Kontext: FLUX.1 Kontext-style in-context image generation and editing."""

__version__ = "0.1.0"
