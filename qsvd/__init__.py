"""qsvd: joint QKV low-rank and low-precision compression of vision-language models."""

__version__ = "0.1.0"
