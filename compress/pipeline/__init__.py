"""Pipelines: the whole job on one file, from reading it to verified outputs.

- `tie_file(path, cfg)`: routes by what the file is (below);
- `tie(loaded, cfg, data=...)`: a model in memory: plan, fine-tune, merge, export, verify;
- `tie_checkpoint(path, out_dir, cfg)`: a (sharded) safetensors checkpoint, tensor by tensor;
- `tie_onnx(path, out, cfg)`: an ONNX file without its PyTorch source.
"""

from .checkpoint import StreamResult, StreamTensor, audit_checkpoint, output_dir_for, tie_checkpoint
from .export_file import export_file
from .exports import ExportOptions
from .onnx import OnnxTieResult, tie_onnx
from .report import TieReport
from .route import route, tie_file
from .tie import DEFAULT_OUT_DIR, TieResult, output_paths, tie

__all__ = [
    "DEFAULT_OUT_DIR",
    "ExportOptions",
    "OnnxTieResult",
    "StreamResult",
    "StreamTensor",
    "TieReport",
    "TieResult",
    "audit_checkpoint",
    "export_file",
    "output_dir_for",
    "output_paths",
    "route",
    "tie",
    "tie_checkpoint",
    "tie_file",
    "tie_onnx",
]
