"""compress: make trained PyTorch models smaller by parameter sharing, and prove they still work.

The packages, lowest layer first: `io` (reading files), `auditing` (what sharing could save),
`tying` (plan, soft-tie, fine-tune, merge), `export` (ONNX and safetensors writers), `verify` and
`runtime` (onnxruntime), `pipeline` (the whole job on one file). See ARCHITECTURE.md.
"""

from .auditing import AuditConfig, AuditReport, TensorTie, audit, find_tensor_ties
from .codebook import Alias, Codebooks, TensorCodebook
from .errors import (
    BadInputError,
    CompressError,
    Option,
    UnsafePickleError,
    UnsupportedModelError,
    VerificationError,
)
from .granularity import Granularity
from .io import DataSplits, Loaded, load, load_data
from .state import codebooks_from_state_dict
from .tying import (
    FinetuneConfig,
    FinetuneResult,
    SoftTie,
    TieConfig,
    TiePlan,
    analyze,
    cluster_tensor,
    decide,
    estimate_importance,
    finetune_,
    merge_,
)

# Names whose modules import onnx / onnxruntime are loaded on first use, so `import compress`
# (and every CLI start) stays light. `verify` itself is `compress.verify.verify`: a top-level name
# would be shadowed by the submodule of the same name.
_LAZY = {
    "ExportOptions": ".pipeline",
    "StreamResult": ".pipeline",
    "TieReport": ".pipeline",
    "TieResult": ".pipeline",
    "tie": ".pipeline",
    "tie_checkpoint": ".pipeline",
    "tie_file": ".pipeline",
    "tie_onnx": ".pipeline",
    "ExportReport": ".export",
    "export_onnx": ".export",
    "export_safetensors": ".export",
    "load_safetensors": ".export",
    "VerifyResult": ".verify",
    "verify_safetensors": ".verify",
    "make_session": ".runtime",
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
    "Granularity",
    "Loaded",
    "Option",
    "SoftTie",
    "StreamResult",
    "TensorCodebook",
    "TensorTie",
    "TieConfig",
    "TiePlan",
    "TieReport",
    "TieResult",
    "UnsafePickleError",
    "UnsupportedModelError",
    "VerificationError",
    "VerifyResult",
    "analyze",
    "audit",
    "cluster_tensor",
    "codebooks_from_state_dict",
    "decide",
    "estimate_importance",
    "export_onnx",
    "export_safetensors",
    "find_tensor_ties",
    "finetune_",
    "load",
    "load_data",
    "load_safetensors",
    "make_session",
    "merge_",
    "tie",
    "tie_checkpoint",
    "tie_file",
    "tie_onnx",
    "verify_safetensors",
]
