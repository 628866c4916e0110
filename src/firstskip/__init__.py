"""firstskip: FiRST layer skipping for Hugging Face decoder LLMs."""

from firstskip.config import FirstSkipConfig
from firstskip.engine import Engine, Generation, Sampling
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel

__version__ = "0.1.0"
__all__ = ["Engine", "FirstSkipConfig", "FirstSkipError", "FirstSkipModel", "Generation", "Sampling"]
