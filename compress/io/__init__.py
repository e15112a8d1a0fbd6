"""Opening files: the one place where `compress` reads a model, checkpoint or data file.

- `load(path)`: any supported model file, recognized by content, never running code from it
  unless the caller trusts it (`trust_pickle=True`); returns a `Loaded`;
- `load_data(path)`: the calibration/test split file (`DataSplits`);
- `open_checkpoint(path)`: a (sharded) safetensors checkpoint read one tensor at a time;
- `load_codebook_safetensors` / `load_codebook_checkpoint`: the toolkit's own codebook files, dense;
- `read_onnx(path)`: an ONNX model with its external data, every location checked.

One reader per format (`pt2`, `torch_save`, `torchscript`, `safetensors`, `onnx`); `safety/` holds
the checks on pickles, zip archives and `.pt2` payloads.
"""

from .checkpoint import Checkpoint, is_safetensors_checkpoint, open_checkpoint, read_tensor
from .codebook_files import load_codebook_checkpoint, load_codebook_safetensors
from .data import load_data
from .load import KINDS, load
from .loaded import DataSplits, Loaded, find_aliases
from .onnx_file import read_onnx

__all__ = [
    "KINDS",
    "Checkpoint",
    "DataSplits",
    "Loaded",
    "find_aliases",
    "is_safetensors_checkpoint",
    "load",
    "load_codebook_checkpoint",
    "load_codebook_safetensors",
    "load_data",
    "open_checkpoint",
    "read_onnx",
    "read_tensor",
]
