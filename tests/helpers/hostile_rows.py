"""Files for the hostile-input regression tests (issue 14), each built small, and a measured CLI run.

Every builder writes into the folder it is given and returns the path; `measured_cli` runs
`python -m cli ...` in a child process and returns its exit code, output, wall time and peak
resident memory (from `wait4`), killing it past a time or memory ceiling so a regression fails the
test instead of the machine.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tests.helpers import ROOT
from tests.helpers.io_files import edit_json_entry, export_pt2, onnx_matmul_model, rewrite_zip

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


# --- a measured run of the command line ------------------------------------------------------------

@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float  # the child's peak resident memory (VmHWM, polled: wait4's maxrss counts the forking parent)


def measured_cli(*args, timeout: float = 60, ceiling_mb: float = 3000, cwd: Path = ROOT,
                 interrupt_after: float | None = None) -> Run:
    """`python -m cli *args` in a child process; stopped (code -9) past `timeout` s or `ceiling_mb` resident."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, env=ENV, stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL)
        sent, peak = False, 0.0
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if interrupt_after is not None and not sent and elapsed >= interrupt_after:
                proc.send_signal(signal.SIGINT)
                sent = True
            resident, high = _memory_mb(proc.pid)
            peak = max(peak, high)
            if elapsed > timeout or resident > ceiling_mb:
                proc.kill()
            time.sleep(0.005)
        out.seek(0), err.seek(0)
        return Run(proc.returncode, out.read().decode(), err.read().decode(), time.monotonic() - started, peak)


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MiB; zeros once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


# --- row 1, 2: TorchScript whose __setstate__ writes a file or never returns ------------------------

class _Stateful(nn.Module):
    """A layer that pickles its state through `__getstate__`, so TorchScript restores it with `__setstate__`."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.w.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)


class WritesOnLoad(_Stateful):
    """`__setstate__` (run by torch.jit.load) saves a tensor to `SENTINEL_PATH`."""

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0]
        self.training = state[1]
        torch.save(torch.zeros(2), "SENTINEL_PATH")


class LoopsOnLoad(_Stateful):
    """`__setstate__` never returns."""

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0]
        self.training = state[1]
        i = 0
        while i >= 0:
            i = i + 1


def torchscript_writing_on_load(folder: Path, sentinel: Path) -> Path:
    """A TorchScript archive whose `__setstate__` would write `sentinel` (its path patched into the code)."""
    path = folder / "writes_on_load.pt"
    torch.jit.save(torch.jit.script(WritesOnLoad()), str(path))
    return rewrite_zip(path, folder / "writes_on_load_.pt",
                       lambda name, data: data.replace(b"SENTINEL_PATH", str(sentinel).encode())
                       if name.endswith(".py") else data)


def torchscript_looping_on_load(folder: Path) -> Path:
    path = folder / "loops_on_load.pt"
    torch.jit.save(torch.jit.script(LoopsOnLoad()), str(path))
    return path


# --- row 3: a pickle of int keys that all hash alike ------------------------------------------------

def colliding_keys_pickle(n: int = 100_000) -> bytes:
    """`{7 + i * (2**61 - 1): 0 for i in range(n)}` as pickle bytes (building the dict itself takes minutes)."""
    out = bytearray(b"\x80\x02}q\x00(")  # PROTO 2, EMPTY_DICT, BINPUT 0, MARK
    for i in range(n):
        key = 7 + i * ((1 << 61) - 1)
        raw = key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)
        out += b"\x8a" + bytes([len(raw)]) + raw + b"K\x00"  # LONG1 key, BININT1 0
    return bytes(out + b"u.")  # SETITEMS, STOP


def colliding_keys_torch_zip(folder: Path, n: int = 100_000) -> Path:
    """The same dict as the `data.pkl` of a torch.save zip."""
    clean = folder / "_clean_state.pt"
    torch.save({"w": torch.zeros(2)}, clean)
    return rewrite_zip(clean, folder / "colliding_keys.pt",
                       lambda name, data: colliding_keys_pickle(n) if name.endswith("/data.pkl") else data)


# --- row 4: .pt2 size expressions that grow when sympy evaluates them -----------------------------------

def pt2_with_expression(folder: Path, expr: str, name: str) -> Path:
    """A clean `.pt2` whose input size expression (`Symbol('s77', ...)`) is replaced by `expr`."""
    clean = export_pt2(folder / "_clean.pt2") if not (folder / "_clean.pt2").exists() else folder / "_clean.pt2"

    def edit(obj):
        text = json.dumps(obj).replace("Symbol('s77', positive=True, integer=True)", expr)
        obj.clear()
        obj.update(json.loads(text))
    return edit_json_entry(clean, folder / name, "models/model.json", edit)


# --- row 5: stride-0 views --------------------------------------------------------------------------

def expanded_state_dict(folder: Path) -> Path:
    """4 bytes of storage viewed as 2**32 elements (3.6 KB on disk)."""
    path = folder / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**20, 2**12)}, path)
    return path


def pt2_with_zero_strides(folder: Path) -> Path:
    """A `.pt2` whose fc1.weight tensor_meta has sizes [2**20, 2**12] and strides [0, 0] over 192 bytes."""
    clean = export_pt2(folder / "_clean0.pt2")

    def edit(cfg):
        meta = cfg["config"]["fc1.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": 2**20}, {"as_int": 2**12}]
        meta["strides"] = [{"as_int": 0}, {"as_int": 0}]
    return edit_json_entry(clean, folder / "zero_strides.pt2", "model_weights_config.json", edit)


def expanded_data(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    path = folder / f"expanded_data_{str(dtype).removeprefix('torch.')}.pt"
    x = torch.zeros(1, dtype=dtype).expand(2**18, 2**12)
    torch.save({"calib_inputs": x, "test_inputs": x}, path)
    return path


# --- row 6: a .pt2 member that expands far past the file ---------------------------------------------

def pt2_with_big_member(folder: Path, declared: int = 1_200 << 20) -> Path:
    """A `.pt2` with an `extra/big.json` entry whose headers declare `declared` bytes (its data is small)."""
    clean = export_pt2(folder / "_clean6.pt2")
    path = rewrite_zip(clean, folder / "big_member.pt2", lambda n, d: d, add={"extra/big.json": b"[" + b"0," * 500 + b"0]"})
    return set_declared_size(path, "extra/big.json", declared)


def set_declared_size(path: Path, suffix: str, size: int) -> Path:
    """Patch the uncompressed size of the entry ending with `suffix` in its local and central headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos, pos = zf.infolist(), zf.start_dir
    for info in infos:
        if info.filename.endswith(suffix):
            struct.pack_into("<I", data, info.header_offset + 22, size)
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if bytes(data[pos + 46:pos + 46 + n]).decode().endswith(suffix):
            struct.pack_into("<I", data, pos + 24, size)
        pos += 46 + n + m + k
    path.write_bytes(bytes(data))
    return path


def pt2_with_deflated_member(folder: Path, size: int = 192 << 20) -> Path:
    """A `.pt2` with a real `extra/big.json` of `size` bytes deflated under the per-entry 1000:1 ratio."""
    clean = export_pt2(folder / "_clean6b.pt2")
    block = (b'{"k": [' + b"1, 2, 3, 4, 5, 6, 7, 8, 9, 0, " * 40)[:512]
    payload = block * (size // len(block))
    out = folder / "deflated_member.pt2"
    rewrite_zip(clean, out, lambda n, d: d)
    with zipfile.ZipFile(out, "a") as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(zipfile.ZipInfo(f"{root}/extra/big.json"), payload, compress_type=zipfile.ZIP_DEFLATED,
                    compresslevel=9)
    return out


# --- row 7: codebook safetensors with a bad recipe ---------------------------------------------------

GOOD_RECIPE = {"codebook": "w.codebook", "indices": "w.indices", "bits": 2, "k": 4, "packing": "lsb0",
               "shape": [3, 4], "dtype": "float32", "granularity": "tensor", "group_size": None}


def codebook_file(path: Path, recipes, aliases=None, tensors: dict | None = None) -> Path:
    """A codebook safetensors file with the given `compress.tensors` (and `compress.aliases`) metadata."""
    from safetensors.torch import save_file

    tensors = tensors if tensors is not None else {"w.codebook": torch.arange(4.0).reshape(1, 4),
                                                   "w.indices": torch.tensor([0b11100100] * 3, dtype=torch.uint8)}
    meta = {"compress.format": "codebook", "compress.format_version": "1", "compress.tensors": json.dumps(recipes)}
    if aliases is not None:
        meta["compress.aliases"] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)
    return path


# --- row 9, 12, 16: ONNX ------------------------------------------------------------------------------

def onnx_model(nodes, inputs, outputs, initializers=(), opset: int = 21, functions=(), domains=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, ir_version=10, opset_imports=opsets, functions=list(functions))


def onnx_constant_of_shape(path: Path, side: int = 30_000) -> Path:
    """A 500-byte model that fills a side x side float tensor."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [side, side])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", 1, [1], [1.0])),
             helper.make_node("Add", ["big", "x"], ["y"])]
    onnx.save(onnx_model(nodes, [x], [y], [shape]), str(path))
    return path


def onnx_loop(path: Path, trips: int | None = 2**62) -> Path:
    """A Loop adding 1 to `x` `trips` times (a constant); with None, the trip count is the input `n`."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    inits = [helper.make_tensor("cond", TensorProto.BOOL, [], [True])]
    inputs = [x]
    if trips is None:
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
    else:
        inits.append(helper.make_tensor("n", TensorProto.INT64, [], [trips]))
    node = helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)
    onnx.save(onnx_model([node], inputs, [y], inits), str(path))
    return path


def onnx_empty_huge_dims(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    onnx.save(onnx_matmul_model([helper.make_tensor("w", TensorProto.FLOAT, [0, 2**62], [])]), str(path))
    return path


def onnx_custom_function(path: Path) -> Path:
    """A model-local function in a custom domain that calls an op nobody defines."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    fn = helper.make_function("custom.dom", "MyFn", ["a", "b"], ["c"],
                              [helper.make_node("Mystery", ["a", "b"], ["c"], domain="custom.dom")],
                              [helper.make_opsetid("", 21), helper.make_opsetid("custom.dom", 1)])
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    model = onnx_model([helper.make_node("MyFn", ["x", "w"], ["y"], domain="custom.dom")], [x], [y], [w],
                       functions=[fn], domains=["custom.dom"])
    onnx.save(model, str(path))
    return path


# --- misc ---------------------------------------------------------------------------------------------

def state_dict_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def elf_weight() -> torch.Tensor:
    """A float32 weight whose first four bytes are `\\x7fELF` (and the next ones Mach-O's `cafebabe`)."""
    raw = b"\x7fELF" + b"\xca\xfe\xba\xbe" + bytes(range(8))
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).clone().reshape(2, 2)

