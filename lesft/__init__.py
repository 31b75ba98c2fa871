"""LESFT: language-empowered split fine-tuning."""

__version__ = "0.1.0"
