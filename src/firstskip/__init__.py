"""firstskip: FiRST layer skipping for Hugging Face decoder LLMs."""

__version__ = "0.1.0"
