"""The public API changes only on purpose: this list is the contract with users."""

import pytest

import compress
import compress.export

PUBLIC = [
    "Alias", "AuditConfig", "AuditReport", "BadInputError", "Codebooks", "CompressError", "DataSplits",
    "ExportOptions", "ExportReport", "FinetuneConfig", "FinetuneResult", "Granularity", "Loaded", "Option",
    "SoftTie", "StreamResult", "TensorCodebook", "TensorTie", "TieConfig", "TiePlan", "TieReport", "TieResult",
    "UnsafePickleError", "UnsupportedModelError", "VerificationError", "VerifyResult", "analyze", "audit",
    "cluster_tensor", "codebooks_from_state_dict", "decide", "estimate_importance", "export_onnx",
    "export_safetensors", "find_tensor_ties", "finetune_", "load", "load_data", "load_safetensors",
    "make_session", "merge_", "tie", "tie_checkpoint", "tie_file", "tie_onnx", "verify_safetensors",
]


def test_public_names_are_pinned():
    assert sorted(compress.__all__) == sorted(PUBLIC)


def test_every_public_name_resolves():
    for name in compress.__all__:
        assert getattr(compress, name) is not None, name


@pytest.mark.slow
def test_import_compress_does_not_load_onnx_or_onnxruntime():
    import subprocess
    import sys

    code = "import sys, compress; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_export_package_surface():
    assert sorted(compress.export.__all__) == sorted([
        "ExportReport", "Loss", "SizeBound", "TensorEntry", "codebooks_from_state_dict", "export_onnx",
        "export_safetensors", "load_safetensors", "model_bound", "onnx_bound", "rewrite_onnx",
    ])
