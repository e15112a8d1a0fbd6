"""Exporters: ONNX and safetensors files that store each merged tensor as codebook + indices.

- `export_onnx`: a merged PyTorch model to ONNX, decode in-graph (`Cast -> Gather`);
- `rewrite_onnx`: an existing ONNX graph whose initializers were clustered;
- `export_safetensors`: codebooks + packed indices, the recipe in the metadata;
- `model_bound` / `onnx_bound`: the independent size bound of a file, from the plan and the model;
- `sharded.ShardWriter`: the same format, sharded and streamed (for checkpoints bigger than memory).

The files are read back by `compress.io` (`load_codebook_safetensors`, `read_onnx`).
"""

from ..io import load_codebook_safetensors as load_safetensors
from ..state import codebooks_from_state_dict
from .bound import model_bound, onnx_bound
from .onnx import export_onnx, rewrite_onnx
from .report import ExportReport, Loss, SizeBound, TensorEntry
from .safetensors import export_safetensors

__all__ = [
    "ExportReport",
    "Loss",
    "SizeBound",
    "TensorEntry",
    "codebooks_from_state_dict",
    "export_onnx",
    "export_safetensors",
    "load_safetensors",
    "model_bound",
    "onnx_bound",
    "rewrite_onnx",
]
