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
from .tie import ExportOptions, TieResult

# Names whose modules import onnx / onnxruntime are loaded on first use, so `import compress`
# (and every CLI start) stays light. `verify` itself is `compress.verify.verify`: a top-level name
# would be shadowed by the submodule of the same name.
_LAZY = {
    "ExportReport": ".export",
    "codebooks_from_state_dict": ".export",
    "export_onnx": ".export",
    "export_safetensors": ".export",
    "load_safetensors": ".export",
    "tie_onnx": ".export",
    "VerifyResult": ".verify",
    "verify_safetensors": ".verify",
    "make_session": ".runtime",
    "StreamResult": ".stream",
    "tie_checkpoint": ".stream",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


__all__ = [
    "Alias",
    "AuditConfig",
    "AuditReport",
    "BadInputError",
    "Codebooks",
    "CompressError",
    "DataSplits",
    "ExportOptions",
    "ExportReport",
    "FinetuneConfig",
    "FinetuneResult",
    "Loaded",
    "SoftTie",
    "StreamResult",
    "TensorCodebook",
    "TensorTie",
    "TieConfig",
    "TiePlan",
    "TieResult",
    "UnsafePickleError",
    "UnsupportedModelError",
    "VerificationError",
    "VerifyResult",
    "analyze",
    "audit",
    "codebooks_from_state_dict",
    "export_onnx",
    "export_safetensors",
    "find_tensor_ties",
    "finetune_",
    "load",
    "load_data",
    "load_safetensors",
    "make_session",
    "merge_",
    "tie_checkpoint",
    "tie_onnx",
    "verify_safetensors",
]
