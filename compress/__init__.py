"""compress: make trained PyTorch models smaller by parameter sharing, and prove they still work."""

from .codebook import Alias, Codebooks, TensorCodebook
from .errors import (
    BadInputError,
    CompressError,
    UnsafePickleError,
    UnsupportedModelError,
    VerificationError,
)

__all__ = [
    "Alias",
    "BadInputError",
    "Codebooks",
    "CompressError",
    "TensorCodebook",
    "UnsafePickleError",
    "UnsupportedModelError",
    "VerificationError",
]
