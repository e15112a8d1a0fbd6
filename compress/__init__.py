"""compress: make trained PyTorch models smaller by parameter sharing, and prove they still work."""

from .audit import AuditConfig, AuditReport, TensorTie, audit, find_tensor_ties
from .codebook import Alias, Codebooks, TensorCodebook
from .errors import (
    BadInputError,
    CompressError,
    UnsafePickleError,
    UnsupportedModelError,
    VerificationError,
)
from .finetune import FinetuneConfig, FinetuneResult, finetune_
from .io import DataSplits, Loaded, load, load_data
from .merge import merge_
from .plan import TieConfig, TiePlan, analyze
from .soft_tie import SoftTie
from .tie import TieResult

__all__ = [
    "Alias",
    "AuditConfig",
    "AuditReport",
    "BadInputError",
    "Codebooks",
    "CompressError",
    "DataSplits",
    "FinetuneConfig",
    "FinetuneResult",
    "Loaded",
    "SoftTie",
    "TensorCodebook",
    "TensorTie",
    "TieConfig",
    "TiePlan",
    "TieResult",
    "UnsafePickleError",
    "UnsupportedModelError",
    "VerificationError",
    "analyze",
    "audit",
    "find_tensor_ties",
    "finetune_",
    "load",
    "load_data",
    "merge_",
]
