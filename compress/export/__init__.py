"""Exporters: ONNX and safetensors files that store each merged tensor as codebook + indices."""

from ._recover import codebooks_from_state_dict
from ._report import ExportReport, TensorEntry
from .onnx import export_onnx, tie_onnx
from .safetensors import export_safetensors, load_safetensors

__all__ = [
    "ExportReport",
    "TensorEntry",
    "codebooks_from_state_dict",
    "export_onnx",
    "export_safetensors",
    "load_safetensors",
    "tie_onnx",
]
