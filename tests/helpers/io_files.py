"""Files for the loader tests: tiny valid models of every format, and hostile files.

Every hostile payload, if it ever ran, would create `<root>/pwned/<id>`; `sentinels(root)` lists
what appeared. `hostile_files(root)` builds the pickle payload files (raw pickles in protocols 0-5,
the same payloads inside a torch.save zip and inside `.pt2` entries, a wrong extension, odd zip
flags) so any command can be run on each of them.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pickle
import pkgutil
import runpy
import shlex
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

PROTOCOLS = (0, 1, 2, 3, 4, 5)
PAYLOAD_KINDS = ("os_system", "builtins_exec", "builtins_eval", "importlib_import_module",
                 "pkgutil_resolve_name", "runpy_run_code", "runpy_run_path", "nested_pickle_loads")


# --- tiny models ----------------------------------------------------------------------------------

class TinyMLP(nn.Module):
    """Two linear layers, a buffer and a plain-tensor constant: parameters, buffers and constants."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))
        self.offset = torch.tensor([0.25, -0.5, 1.0])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale + self.offset


class TiedEmbeddingHead(nn.Module):
    """A language-model shape: the output head shares the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def save_state_dict(path: Path, model: nn.Module | None = None) -> Path:
    torch.save((model or TinyMLP()).state_dict(), path)
    return path


def export_pt2(path: Path, model: nn.Module | None = None, batch: int = 4) -> Path:
    model = (model or TinyMLP()).eval()
    program = torch.export.export(model, (torch.randn(batch, 8),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    torch.export.save(program, str(path))
    return path


# --- hostile payloads -----------------------------------------------------------------------------

class _Reduce:
    """Pickles as `func(*args)`; callable so it can stand in for the function of an outer reduce."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):  # never called here; pickle only requires a callable
        raise AssertionError("not to be called")


def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def payload(kind: str, sentinel: Path) -> object:
    """An object whose unpickling runs code (through `kind`) that creates `sentinel`."""
    touch = _touch_code(sentinel)
    shell = f"touch {shlex.quote(str(sentinel))}"
    if kind == "os_system":
        return _Reduce(os.system, (shell,))
    if kind == "builtins_exec":
        return _Reduce(builtins.exec, (touch,))
    if kind == "builtins_eval":
        return _Reduce(builtins.eval, (touch,))
    if kind == "importlib_import_module":
        system = _Reduce(getattr, (_Reduce(importlib.import_module, ("os",)), "system"))
        return _Reduce(system, (shell,))
    if kind == "pkgutil_resolve_name":
        return _Reduce(_Reduce(pkgutil.resolve_name, ("os:system",)), (shell,))
    if kind == "runpy_run_code":
        return _Reduce(runpy._run_code, (touch, {}))
    if kind == "runpy_run_path":
        script = sentinel.parent.parent / f"script-{sentinel.name}.py"
        script.write_text(touch + "\n")
        return _Reduce(runpy.run_path, (str(script),))
    if kind == "nested_pickle_loads":
        return _Reduce(pickle.loads, (pickle.dumps(_Reduce(os.system, (shell,)), protocol=2),))
    raise ValueError(kind)


def payload_bytes(kind: str, sentinel: Path, protocol: int = 2) -> bytes:
    sentinel.parent.mkdir(parents=True, exist_ok=True)
    return pickle.dumps(payload(kind, sentinel), protocol=protocol)


def sentinel_dir(root: Path) -> Path:
    return root / "pwned"


def sentinels(root: Path) -> list[str]:
    """Names of sentinel files that payloads created (must stay empty)."""
    d = sentinel_dir(root)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --- rewriting archives ---------------------------------------------------------------------------

def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
                add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip entry by entry through `edit(name, data)` (None drops the entry), then add entries."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = edit(info.filename, zi.read(info.filename))
            if data is not None:
                zo.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data)
        root = zi.namelist()[0].split("/", 1)[0]
        for name, data in (add or {}).items():
            zo.writestr(f"{root}/{name}", data)
    return dst


def set_zip_flags(path: Path, bits: int, suffix: str = "") -> Path:
    """OR `bits` into the flags of entries ending with `suffix`, in local and central headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos, pos = zf.infolist(), zf.start_dir
    for info in infos:
        if info.filename.endswith(suffix):
            struct.pack_into("<H", data, info.header_offset + 6, info.flag_bits | bits)
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if bytes(data[pos + 46:pos + 46 + n]).decode().endswith(suffix):
            struct.pack_into("<H", data, pos + 8, struct.unpack_from("<H", data, pos + 8)[0] | bits)
        pos += 46 + n + m + k
    path.write_bytes(bytes(data))
    return path


def replace_entry(src: Path, dst: Path, suffix: str, data: bytes) -> Path:
    """Copy `src` with the entry whose name ends with `suffix` replaced by `data`."""
    return rewrite_zip(src, dst, lambda name, old: data if name.endswith(suffix) else old)


def edit_json_entry(src: Path, dst: Path, suffix: str, edit: Callable[[dict], None]) -> Path:
    def _edit(name: str, old: bytes) -> bytes:
        if not name.endswith(suffix):
            return old
        obj = json.loads(old)
        edit(obj)
        return json.dumps(obj).encode()
    return rewrite_zip(src, dst, _edit)


def torch_zip_with_pickle(data_pkl: bytes, tmp: Path) -> bytes:
    """A torch.save zip (of a small state_dict) whose data.pkl is replaced."""
    src = tmp / "_clean_state.pt"
    if not src.exists():
        save_state_dict(src)
    out = tmp / "_zipped_payload.pt"
    replace_entry(src, out, "/data.pkl", data_pkl)
    return out.read_bytes()


def pt2_with_pickled_constant(clean_pt2: Path, dst: Path, data: bytes) -> Path:
    """The constant `offset` marked `use_pickle` (as torch does for tensor subclasses), its bytes replaced."""
    cfg_name = "model_constants_config.json"
    with zipfile.ZipFile(clean_pt2) as z:
        cfg = json.loads(next(z.read(n) for n in z.namelist() if n.endswith(cfg_name)))
    file = cfg["config"]["offset"]["path_name"]
    cfg["config"]["offset"]["use_pickle"] = True

    def _edit(name: str, old: bytes) -> bytes:
        if name.endswith(cfg_name):
            return json.dumps(cfg).encode()
        return data if name.endswith(f"data/constants/{file}") else old
    return rewrite_zip(clean_pt2, dst, _edit)


def pt2_with_opaque_constant(clean_pt2: Path, dst: Path, data: bytes) -> Path:
    """A constant stored as `opaque_obj_0`, which torch reads with plain `pickle.loads`."""
    cfg_name = "model_constants_config.json"
    with zipfile.ZipFile(clean_pt2) as z:
        cfg = json.loads(next(z.read(n) for n in z.namelist() if n.endswith(cfg_name)))
    cfg["config"]["offset"]["path_name"] = "opaque_obj_0"
    cfg["config"]["offset"]["use_pickle"] = True  # so torch does not first read it as raw tensor bytes
    new_cfg = json.dumps(cfg).encode()
    return rewrite_zip(clean_pt2, dst, lambda n, old: new_cfg if n.endswith(cfg_name) else old,
                       add={"data/constants/opaque_obj_0": data})


# --- the catalogue of hostile pickle files --------------------------------------------------------

def hostile_ids() -> list[str]:
    """The ids `hostile_files` builds, known without building them (for parametrize)."""
    ids = []
    for kind in PAYLOAD_KINDS:
        ids += [f"pickle-{kind}-p{proto}" for proto in PROTOCOLS] + [f"torch_zip-{kind}"]
    for kind in PAYLOAD_KINDS:
        ids += [f"pt2_sample_inputs-{kind}", f"pt2_constant-{kind}"]
    ids += ["pt2_sample_inputs_zipped-os_system", "pt2_opaque_constant-os_system"]
    ids += [f"wrong_extension-{ext}" for ext in ("safetensors", "onnx", "json", "pt2")]
    return ids + ["zip_odd_flags-os_system"]


def hostile_files(root: Path) -> dict[str, Path]:
    """Build every pickle payload file under `root/hostile`: id -> path. Payloads write to `sentinel_dir`."""
    out_dir = root / "hostile"
    out_dir.mkdir(parents=True, exist_ok=True)
    pwn = sentinel_dir(root)
    files: dict[str, Path] = {}
    for kind in PAYLOAD_KINDS:
        for proto in PROTOCOLS:
            fid = f"pickle-{kind}-p{proto}"
            files[fid] = _write(out_dir / f"{fid}.pt", payload_bytes(kind, pwn / fid, proto))
        fid = f"torch_zip-{kind}"
        zipped = torch_zip_with_pickle(payload_bytes(kind, pwn / fid), out_dir)
        files[fid] = _write(out_dir / f"{fid}.pt", zipped)
    clean = export_pt2(out_dir / "_clean.pt2")
    for kind in PAYLOAD_KINDS:
        fid = f"pt2_sample_inputs-{kind}"
        files[fid] = replace_entry(clean, out_dir / f"{fid}.pt2", "data/sample_inputs/model.pt",
                                   payload_bytes(kind, pwn / fid))
        fid = f"pt2_constant-{kind}"
        files[fid] = pt2_with_pickled_constant(clean, out_dir / f"{fid}.pt2", payload_bytes(kind, pwn / fid))
    fid = "pt2_sample_inputs_zipped-os_system"
    files[fid] = replace_entry(clean, out_dir / f"{fid}.pt2", "data/sample_inputs/model.pt",
                               torch_zip_with_pickle(payload_bytes("os_system", pwn / fid), out_dir))
    fid = "pt2_opaque_constant-os_system"
    opaque = payload_bytes("os_system", pwn / fid)
    files[fid] = pt2_with_opaque_constant(clean, out_dir / f"{fid}.pt2", opaque)
    for ext in ("safetensors", "onnx", "json", "pt2"):
        fid = f"wrong_extension-{ext}"
        files[fid] = _write(out_dir / f"model.{ext}", payload_bytes("os_system", pwn / fid))
    fid = "zip_odd_flags-os_system"
    state = save_state_dict(out_dir / "_flags_base.pt")
    replace_entry(state, out_dir / f"{fid}.pt", "/data.pkl", payload_bytes("os_system", pwn / fid))
    files[fid] = set_zip_flags(out_dir / f"{fid}.pt", 0x0001, "/data.pkl")  # "encrypted"
    (out_dir / "_clean.pt2").unlink()
    for scratch in ("_clean_state.pt", "_zipped_payload.pt", "_flags_base.pt"):
        (out_dir / scratch).unlink(missing_ok=True)
    return files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- safetensors headers --------------------------------------------------------------------------

def safetensors_bytes(header: dict | bytes, data: bytes = b"", claimed_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict or JSON bytes) and data, maybe lying about the length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + data


# --- ONNX -----------------------------------------------------------------------------------------

def onnx_matmul_model(initializers: list, ir_version: int = 10, opset: int = 21):
    """x [batch, 4] @ w -> y: a valid graph around whatever initializers a test needs."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y], initializer=initializers)
    return helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", opset)])


def external_tensor(name: str, dims: list[int], entries: list[tuple[str, str]], data_type: int = 1):
    """A TensorProto marked EXTERNAL with exactly these external_data key/value pairs."""
    from onnx import TensorProto

    t = TensorProto(name=name, dims=dims, data_type=data_type)
    t.data_location = TensorProto.EXTERNAL
    for key, value in entries:
        t.external_data.add(key=key, value=value)
    return t
