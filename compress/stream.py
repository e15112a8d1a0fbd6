"""Checkpoints bigger than memory: post-training tie and audit of (sharded) safetensors, tensor by tensor.

`tie_checkpoint(index_or_file, out_dir, cfg)` clusters a `.safetensors` file or a sharded
`*.safetensors.index.json` checkpoint without ever holding it: every tensor is read through a
memory map opened for that tensor alone (a handle kept open would keep every page it touched
resident), clustered, and streamed into output shards on disk. Independent tensors are clustered
by a pool of worker processes; each worker opens the shard itself by path and name, so no tensor
data is pickled to it, and at most `2 * workers` tensors are in flight. Peak memory is a small
multiple of the largest tensor (k-means works in float64 on a sorted copy), whatever the size of
the checkpoint.

Decisions and numbers are those of the in-memory path (`analyze` + `merge_`): the same per-tensor
rules (`TieConfig`: bits or tolerance, granularity, include/exclude globs, min_elements, by_name
overrides; by_type needs module types, which a checkpoint does not have), the same k-means, the
same nearest-shared-value assignment, and tensor-level ties when `cfg.tie_tensors` is set (one
extra read of the candidates). Non-float, small and excluded tensors are copied byte for byte.
The output does not depend on the number of workers.

Output folder (it appears complete or not at all: written into a temporary folder next to it,
renamed into place at the end):

- `model-00001-of-0000N.safetensors`: shards in the codebook format of
  `compress.export.safetensors` (`<name>.codebook`, `<name>.indices` packed "lsb0", dense tensors
  under their own names, the recipe in `__metadata__`), each readable by `load_safetensors`; an
  alias is recorded in the shard that holds its target;
- `model.safetensors.index.json`: Hugging Face style `weight_map` (stored tensor -> shard) and
  `metadata` with `total_size`, `compress.format`, `compress.format_version`, `compress.tensors`
  (every logical tensor -> its shard), `compress.config` and `compress.source`;
- `stream.report.json`: the `StreamResult`.

    >>> result = tie_checkpoint("llm/model.safetensors.index.json", "llm.tied", TieConfig(bits=4))
    >>> tensors = load_sharded("llm.tied/model.safetensors.index.json")   # dense, the merged values
    >>> report = audit_checkpoint("llm/model.safetensors.index.json")     # streams too
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _safetensors_header as st_header
from ._atomic import TMP_PREFIX, _fsync
from ._library_errors import library_call
from ._units import format_iec
from .codebook import bits_for, row_offsets
from .errors import BadInputError, CompressError
from .export._pack import PACKING, pack_bits
from .io import Loaded
from .merge import nearest_labels
from .plan import TensorPlan, TieConfig, _check_finite, _cluster_into, _decide

STREAM_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
REPORT_NAME = "stream.report.json"
DEFAULT_SHARD_BYTES = 1 << 30
CODEBOOK_FORMAT = "codebook"  # the values of compress.export.safetensors.FORMAT / FORMAT_VERSION
CODEBOOK_FORMAT_VERSION = 1
_CHUNK = 1 << 20  # elements per step when assigning labels (bounds the temporaries)
_PACK_CHUNK = 1 << 16  # a multiple of 8: chunks pack to whole bytes, so their concatenation is exact
_COPY_CHUNK = 8 << 20
# A worker's peak: imports, then about 56 bytes per element of the tensor it clusters (k-means in
# float64: values, sorted copy, two prefix sums, distinct values, labels). Measured 1.1 GiB for 16.8M.
_WORKER_BASE = 256 << 20
_WORKER_BYTES = 56


# --- results --------------------------------------------------------------------------------------

@dataclass
class StreamTensor:
    """One tensor of the checkpoint: what happened to it, where it went, and what it costs now.

    `action` is "cluster" (codebook + packed indices), "keep" (copied as it was) or "alias" (stored
    as `target`, transposed when `transpose`); `shard` is the output file holding it (for an alias,
    its target's). `rms_error`/`max_error` compare the stored values with the original ones.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    reason: str
    shard: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    bits: int | None = None
    k: int | None = None
    granularity: str | None = None
    group_size: int | None = None
    rms_error: float | None = None
    max_error: float | None = None
    target: str | None = None
    transpose: bool = False

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> StreamTensor:
        _known_keys(cls, d, "stream tensor")
        d = dict(d)
        d["shape"] = tuple(int(s) for s in d["shape"])
        return cls(**d)


@dataclass
class StreamResult:
    """What `tie_checkpoint` wrote: per-tensor rows, sizes, time and peak memory.

    `bytes_before`/`bytes_after` count tensor data (shared storage once); `file_bytes` is the size of
    the output shards and index on disk. `peak_rss_bytes` is the peak resident memory (VmHWM) of the calling
    process, `worker_peak_rss_bytes` the largest peak of any worker process (0 without workers).
    """

    source: str
    out_dir: str
    index: str
    shards: list[str]
    config: dict
    workers: int
    tensors: list[StreamTensor]
    bytes_before: int
    bytes_after: int
    file_bytes: int
    peak_rss_bytes: int
    worker_peak_rss_bytes: int
    seconds: float
    version: int = STREAM_VERSION

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["tensors"] = [t.to_dict() for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> StreamResult:
        if d.get("version") != STREAM_VERSION:
            raise BadInputError(f"stream result version {d.get('version')!r} is not supported (this is "
                                f"{STREAM_VERSION}); re-run tie_checkpoint")
        _known_keys(cls, d, "stream result")
        d = dict(d)
        d["tensors"] = [StreamTensor.from_dict(t) for t in d["tensors"]]
        return cls(**d)

    def tensor(self, name: str) -> StreamTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_table(self, top: int | None = 25):
        """A rich table: the largest tensors first, with totals, time and peak memory in the caption."""
        from rich import box
        from rich.table import Table

        rows = sorted(self.tensors, key=lambda t: (-t.bytes_before, t.name))
        more = len(rows) - top if top is not None and len(rows) > top else 0
        table = Table(title=f"{Path(self.source).name} -> {self.index} ({len(self.shards)} shards)",
                      title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left")
        for head in ("tensor", "shape", "dtype", "action", "bits", "before", "after", "RMS error", "shard"):
            table.add_column(head, justify="right" if head in ("bits", "before", "after", "RMS error") else "left")
        for t in rows[: len(rows) - more]:
            table.add_row(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype,
                          t.action if t.action != "keep" else f"keep ({t.reason})", _dash(t.bits),
                          format_iec(t.bytes_before), format_iec(t.bytes_after),
                          "-" if t.rms_error is None else f"{t.rms_error:.2e}", t.shard or "-")
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        table.caption = (f"{f'{more} more tensors not shown. ' if more else ''}"
                         f"{format_iec(self.bytes_before)} -> {format_iec(self.bytes_after)} ({ratio:.2f}x) in "
                         f"{self.seconds:.1f} s with {self.workers} worker(s); peak memory "
                         f"{format_iec(self.peak_rss_bytes)} (main), {format_iec(self.worker_peak_rss_bytes)} "
                         "(largest worker)")
        return table


def _dash(v) -> str:
    return "-" if v is None else str(v)


def _known_keys(cls, d: Mapping, what: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            raise BadInputError(f"{what}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")


# --- public entry points --------------------------------------------------------------------------

def tie_checkpoint(index_or_file: str | Path, out_dir: str | Path, cfg: TieConfig | None = None, *,
                   workers: int | None = None, force: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> StreamResult:
    """Cluster a (sharded) safetensors checkpoint tensor by tensor into a sharded codebook checkpoint.

    Args:
        index_or_file: a `.safetensors` file or a `*.safetensors.index.json` (shards next to it).
        out_dir: the folder to create; it holds the output shards, `model.safetensors.index.json`
            and `stream.report.json`, and appears complete or not at all.
        cfg: the `TieConfig` (default: 4 bits per tensor). `importance` and `by_type` are refused:
            a checkpoint has no model to take gradients from and no module types.
        workers: processes clustering in parallel (default: every core, as many as the available
            memory holds at about 1.1 GiB per 16M-element tensor; 1 clusters in this process). The
            output is the same for any number.
        force: replace an existing `out_dir` written by an earlier `tie_checkpoint`.
        max_shard_bytes: output shards are started anew before they would exceed this (a tensor
            larger than it gets a shard of its own).

    Returns:
        `StreamResult` with every tensor's action, bits, K, error and sizes, and the peak memory.

    >>> r = tie_checkpoint("ckpt/model.safetensors.index.json", "ckpt.tied", TieConfig(bits=4), workers=4)
    >>> r.bytes_before / r.bytes_after > 7
    True
    """
    started = time.perf_counter()
    cfg = cfg or TieConfig()
    _check_config(cfg)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise BadInputError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    src, out_dir = Path(index_or_file), Path(out_dir)
    ckpt = _Checkpoint.open(src)
    ckpt.refuse_codebook_input()
    _check_out_dir(out_dir, ckpt, force)
    items = _plan(ckpt, cfg)
    _check_stored_names(items, src)
    n_workers = _worker_count(workers, items)
    tmp = _temp_dir(out_dir)
    try:
        written = _write_shards(tmp, ckpt, items, n_workers, max_shard_bytes)
        index = _index_json(written, items, cfg, src)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        rows = written.rows(items)
        files = sum(p.stat().st_size for p in tmp.iterdir())
        result = StreamResult(str(src), str(out_dir), INDEX_NAME, written.names, cfg.to_dict(), n_workers, rows,
                              sum(s.nbytes for s in ckpt.sources.values()), sum(r.bytes_after for r in rows),
                              files, _peak_rss(), written.worker_peak, round(time.perf_counter() - started, 3))
        _write_report(tmp / REPORT_NAME, result)
        _fsync_all(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def load_sharded(index: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded codebook checkpoint written by `tie_checkpoint`, dense.

    Each shard is read with `compress.export.safetensors.load_safetensors` (so every value is exactly
    the merged one and aliases are re-tied); shard paths are checked to stay inside the index's
    folder, and the tensors found must be exactly those the index lists. Holds the whole model in
    memory: for checkpoints bigger than memory read shard by shard with `load_safetensors`.

    >>> tensors = load_sharded("ckpt.tied/model.safetensors.index.json")
    >>> model.load_state_dict(tensors)
    """
    from .export.safetensors import load_safetensors

    index = Path(index)
    if not index.is_file():
        raise BadInputError(f"{index}: no such file")
    weight_map = st_header.read_index(index)
    logical = _codebook_index_tensors(index, weight_map)
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        for name, t in load_safetensors(shard).items():
            if name in out:
                raise BadInputError(f"{index}: tensor {name!r} is stored in more than one shard; the checkpoint "
                                    "is corrupt")
            if logical.get(name) != shard.name:
                raise BadInputError(f"{index}: shard {shard.name} holds {name!r}, which the index "
                                    f"{'places in ' + logical[name] if name in logical else 'does not list'}")
            out[name] = t
    missing = [n for n in logical if n not in out]
    if missing:
        raise BadInputError(f"{index}: tensor {missing[0]!r} is listed but no shard holds it")
    return {n: out[n] for n in logical}


def open_checkpoint(path: str | Path) -> Loaded:
    """A `Loaded` whose tensors are read one at a time, each through a memory map opened for it alone.

    `compress.io.load` keeps one handle per shard open, so every page read stays mapped and the
    resident memory of a full pass grows with the checkpoint; here it stays at the largest tensor.

    >>> report = audit(open_checkpoint("ckpt/model.safetensors.index.json"))
    """
    ckpt = _Checkpoint.open(Path(path))
    return Loaded(path=Path(path), kind="safetensors", tensors=_LazyTensors(ckpt), aliases=dict(ckpt.aliases))


def audit_checkpoint(path: str | Path, cfg=None, *, progress: bool | None = None):
    """`compress.audit.audit` of a (sharded) safetensors checkpoint with memory bounded by its largest tensor.

    >>> audit_checkpoint("ckpt/model.safetensors.index.json").totals.bytes
    """
    from .audit import audit

    return audit(open_checkpoint(path), cfg, progress=progress)


def output_dir_for(input_path: str | Path, parent: str | Path) -> Path:
    """The folder `compress tie` writes a checkpoint's output to: `<parent>/<stem>.tied`.

    >>> output_dir_for("llm/model.safetensors.index.json", "compressed")
    PosixPath('compressed/model.tied')
    """
    name = Path(input_path).name
    for suffix in (".safetensors.index.json", ".index.json", ".safetensors", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return Path(parent) / f"{name}.tied"


def is_safetensors_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a `.safetensors` file or a `*.safetensors.index.json` (by content), for routing."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(64)
    if st_header.is_safetensors(head, path.stat().st_size):
        return True
    return path.name.endswith(".safetensors.index.json") and head.lstrip()[:1] == b"{"


# --- the input checkpoint -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where one stored tensor's bytes are: the file, the name in it, and [start, end) in the file."""

    file: Path
    stored: str
    spec: st_header.TensorSpec
    offset: int  # absolute file offset of the tensor's first byte

    @property
    def nbytes(self) -> int:
        return self.spec.end - self.spec.start

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype


@dataclass
class _Checkpoint:
    path: Path
    sources: dict[str, _Source]  # stored tensors, in the checkpoint's order
    aliases: dict[str, str]  # name -> stored name it shares storage with
    metadata: dict[Path, dict[str, str]]

    @classmethod
    def open(cls, path: Path) -> _Checkpoint:
        """Validate the file or index and every shard header (`compress.io`'s checks); read no tensor."""
        if not path.exists():
            raise BadInputError(f"{path}: file not found")
        if path.is_dir():
            raise BadInputError(f"{path}: is a folder; give the *.safetensors.index.json inside it (or a "
                                ".safetensors file)")
        with library_call(path, "opening the file"), open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
        if st_header.is_safetensors(head, size) or (path.suffix == ".safetensors" and size):
            _, aliases = st_header.load_safetensors(path)
            files = {name: path for name in st_header.read_header(path).tensors}
        elif size and (path.name.endswith(".json") or head.lstrip()[:1] == b"{"):
            _, aliases = st_header.load_sharded(path)
            files = st_header.read_index(path)
        else:
            raise BadInputError(f"{path}: not a .safetensors file or a *.safetensors.index.json; checkpoints "
                                "are streamed from safetensors only (`compress tie` reads the other formats)")
        headers = {f: (st_header.read_header(f), _data_start(f)) for f in dict.fromkeys(files.values())}
        sources = {}
        for name, file in files.items():
            header, base = headers[file]
            spec = header.tensors[name]
            sources[name] = _Source(file, name, spec, base + spec.start)
        if not sources:
            raise BadInputError(f"{path}: the checkpoint holds no tensors")
        return cls(path, sources, aliases, {f: h.metadata for f, (h, _) in headers.items()})

    def refuse_codebook_input(self) -> None:
        for file, meta in self.metadata.items():
            if meta.get("compress.format") == CODEBOOK_FORMAT:
                raise BadInputError(f"{file}: already a codebook checkpoint written by compress; there is nothing "
                                    "to tie (read it with compress.stream.load_sharded)")

    def read(self, name: str) -> torch.Tensor:
        src = self.sources[self.aliases.get(name, name)]
        return _read_tensor(src.file, src.stored)


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _read_tensor(file: Path | str, stored: str) -> torch.Tensor:
    """One tensor through a memory map opened for it alone (the tensor keeps the map alive, no longer)."""
    from safetensors import safe_open

    with library_call(file, f"reading tensor {stored!r}"), safe_open(str(file), framework="pt") as f:
        return f.get_tensor(stored)


class _LazyTensors(Mapping):
    """name -> tensor of a checkpoint, read on access; stored names in order, then aliases."""

    def __init__(self, ckpt: _Checkpoint):
        self._ckpt = ckpt
        self._names = [*ckpt.sources, *(a for a in ckpt.aliases if a not in ckpt.sources)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ckpt.sources and name not in self._ckpt.aliases:
            raise KeyError(name)
        return self._ckpt.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of `name` without reading it."""
        src = self._ckpt.sources[self._ckpt.aliases.get(name, name)]
        return src.dtype, src.spec.shape


# --- what happens to each tensor ------------------------------------------------------------------

@dataclass
class _Item:
    name: str
    action: str  # "cluster" | "keep" | "alias"
    reason: str
    source: _Source | None = None  # its bytes in the input (None for a name sharing another's storage)
    settings: Any = None  # plan._Settings, for "cluster"
    target: str | None = None
    transpose: bool = False


def _check_config(cfg: TieConfig) -> None:
    if cfg.importance:
        raise BadInputError("importance weighting needs a model and calibration data; a checkpoint is tied "
                            "post-training only (drop --importance, or use `compress tie` on a model file)")
    if cfg.by_type:
        raise BadInputError(f"by_type overrides ({', '.join(cfg.by_type)}) need module types, which a "
                            "safetensors checkpoint does not have; use by_name globs instead")


def _plan(ckpt: _Checkpoint, cfg: TieConfig) -> list[_Item]:
    """Each tensor's action by `plan`'s own rules (no module types: the fallback rule), ties included."""
    items: dict[str, _Item] = {}
    for name, src in ckpt.sources.items():
        meta = torch.empty(src.spec.shape, dtype=src.dtype, device="meta")
        action, reason, settings = _decide(name, meta, None, "fallback", cfg)
        items[name] = _Item(name, action, reason, src, settings)
    if cfg.tie_tensors:
        for b, (a, transpose, kind) in _tensor_ties(ckpt, items, cfg).items():
            items[b] = _Item(b, "alias", f"transposed copy of `{a}`" if transpose else f"{kind} copy of `{a}`",
                             items[b].source, target=a, transpose=transpose)
    for alias, kept in ckpt.aliases.items():
        target, transpose = kept, False
        if items[kept].action == "alias":  # the kept name is itself stored as another: point at that one
            target, transpose = items[kept].target, items[kept].transpose
        items[alias] = _Item(alias, "alias", f"the same storage as `{kept}`", target=target, transpose=transpose)
    return list(items.values())


def _tensor_ties(ckpt: _Checkpoint, items: dict[str, _Item], cfg: TieConfig) -> dict[str, tuple[str, bool, str]]:
    """`plan._plan_ties` over the clustering candidates, read one at a time: b -> (a, transpose, kind)."""
    from .audit import find_tensor_ties

    names = [n for n, it in items.items() if it.action == "cluster"]
    if len(names) < 2:
        return {}
    sub = _Checkpoint(ckpt.path, {n: ckpt.sources[n] for n in names}, {}, ckpt.metadata)
    ties: dict[str, tuple[str, bool, str]] = {}
    taken: set[str] = set()
    for tie in find_tensor_ties(_LazyTensors(sub), cfg.tie_tolerance):
        a, b = tie.a, tie.b
        if tie.kind == "shared" or b in taken or a in taken or a == b:
            continue
        if tie.kind == "near" and tie.rel_error > cfg.tie_tolerance:
            continue
        ties[b] = (a, tie.kind == "transposed", tie.kind)
        taken.add(b)
    return ties


def _stored_keys(item: _Item) -> list[str]:
    if item.action == "cluster":
        return [f"{item.name}.codebook", f"{item.name}.indices"]
    return [item.name] if item.action == "keep" else []


def _check_stored_names(items: list[_Item], path: Path) -> None:
    owner: dict[str, str] = {}
    for it in items:
        for key in _stored_keys(it):
            if key in owner:
                raise BadInputError(f"{path}: tensor {owner[key]!r} and the codebook of {it.name!r} would both be "
                                    f"stored as {key!r}; rename one, or pass --exclude '{it.name}'")
            owner[key] = it.name


def _worker_count(workers: int | None, items: list[_Item]) -> int:
    """The number asked for, or every core, as many as available memory holds (see `_WORKER_BYTES`)."""
    jobs = [it.source.spec.shape for it in items if it.action == "cluster"]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        need = _WORKER_BASE + _WORKER_BYTES * max((math.prod(s) for s in jobs), default=0)
        available = _available_memory()
        if available is not None:
            workers = min(workers, max(1, available // need))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BadInputError(f"workers must be a positive integer, got {workers!r}")
    return max(1, min(workers, len(jobs)))


def _available_memory() -> int | None:
    with contextlib.suppress(OSError, AttributeError):
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    return None


# --- clustering one tensor (runs in a worker process) ---------------------------------------------

@dataclass(frozen=True)
class _Job:
    name: str
    file: str
    stored: str
    settings: Any


@dataclass
class _Clustered:
    """A clustered tensor, compact: the codebook's raw bytes (weight dtype) and the packed indices."""

    codebook: bytes
    groups: int
    k: int
    bits: int
    granularity: str
    group_size: int | None
    packed: np.ndarray
    rms_error: float
    max_error: float
    peak_rss: int

    @property
    def nbytes(self) -> int:
        return len(self.codebook) + self.packed.nbytes


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core already


def _cluster_job(job: _Job) -> _Clustered:
    """Open the shard by path, read one tensor, cluster it: nothing large crosses the process boundary."""
    w = _read_tensor(job.file, job.stored)
    return _cluster(job.name, w, job.settings)


def _cluster(name: str, w: torch.Tensor, settings) -> _Clustered:
    """`analyze`'s clustering (`plan._cluster_into`), then `merge_`'s codebook and nearest-value indices."""
    _check_finite(name, w)
    tp = TensorPlan(name, tuple(w.shape), str(w.dtype).removeprefix("torch."), None, "cluster", "")
    _cluster_into(tp, w, settings, None)
    tp.labels = None  # merge_ assigns every weight to its nearest stored value instead
    centers = tp.centers_tensor().to(w.dtype)
    labels, sq, worst = _nearest(w, centers, tp.granularity, tp.group_size)
    bits = bits_for(tp.k)
    packed = _pack(labels, bits)
    del labels
    raw = centers.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    n = max(w.numel(), 1)
    return _Clustered(raw, int(centers.shape[0]), tp.k, bits, tp.granularity, tp.group_size, packed,
                      math.sqrt(sq / n), worst, _peak_rss())


def _nearest(w: torch.Tensor, centers: torch.Tensor, granularity: str, group_size: int | None
             ) -> tuple[np.ndarray, float, float]:
    """`merge.nearest_labels` a block of rows at a time (same result, bounded temporaries), as uint8,
    with the squared and the largest error of the stored values."""
    rows = w.shape[0] if w.ndim else 1
    flat = w.reshape(rows, -1)
    cols, k = flat.shape[1], centers.shape[1]
    step = max(1, min(_CHUNK // max(cols, 1), _CHUNK // k))  # nearest_labels makes [rows, k] mid tables
    if granularity == "group":
        step = max(group_size, step // group_size * group_size)  # whole groups per block
    labels = np.empty(rows * cols, dtype=np.uint8)
    sq, worst = 0.0, 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = flat[r0:r1]
        c = _centers_for_rows(centers, granularity, group_size, r0, r1)
        lab = nearest_labels(part, c, granularity, group_size)
        stored = c.reshape(-1)[(lab + row_offsets(tuple(part.shape), granularity, group_size, k)).reshape(-1)]
        diff = stored.double() - part.reshape(-1).double()
        if diff.numel():
            sq += float(diff.square().sum())
            worst = max(worst, float(diff.abs().max()))
        labels[r0 * cols: r1 * cols] = lab.reshape(-1).numpy()
    return labels, sq, worst


def _centers_for_rows(centers: torch.Tensor, granularity: str, group_size: int | None, r0: int, r1: int):
    if granularity == "tensor":
        return centers
    if granularity == "channel":
        return centers[r0:r1]
    return centers[r0 // group_size: -(-r1 // group_size)]


def _pack(labels: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` in chunks of whole bytes (it makes an [n, bits] int64 table of the whole input)."""
    if bits == 8 or labels.size <= _PACK_CHUNK:
        return pack_bits(labels, bits)
    return np.concatenate([pack_bits(labels[i:i + _PACK_CHUNK], bits) for i in range(0, labels.size, _PACK_CHUNK)])


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    with contextlib.suppress(OSError, AttributeError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- running the jobs -----------------------------------------------------------------------------

class _Deferred:
    """A job run in this process when its result is wanted (workers=1)."""

    def __init__(self, job: _Job):
        self._job = job

    def result(self) -> _Clustered:
        return _cluster_job(self._job)


@contextlib.contextmanager
def _submitter(workers: int) -> Iterator[Callable[[_Job], Any]]:
    """`submit(job) -> future`; with several workers a spawn-context process pool, torn down on error."""
    if workers == 1:
        yield _Deferred
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        yield lambda job: pool.submit(_cluster_job, job)
    except BrokenProcessPool as e:
        pool.shutdown(wait=True, cancel_futures=True)
        raise CompressError("a worker process died while clustering (out of memory? a script that starts "
                            "workers needs `if __name__ == \"__main__\":`); nothing was written; retry with "
                            "fewer workers (workers=1 clusters in this process)") from e
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _in_order(items: list[_Item], submit: Callable[[_Job], Any], window: int
              ) -> Iterator[tuple[_Item, _Clustered | None]]:
    """Yield (item, clustered or None) in the checkpoint's order, with at most `window` jobs in flight."""
    pending: deque = deque()
    todo = iter(items)
    in_flight = 0
    while True:
        while in_flight < window:
            it = next(todo, None)
            if it is None:
                break
            future = None
            if it.action == "cluster":
                future = submit(_Job(it.name, str(it.source.file), it.source.stored, it.settings))
                in_flight += 1
            pending.append((it, future))
        if not pending:
            return
        it, future = pending.popleft()
        if future is None:
            yield it, None
        else:
            in_flight -= 1
            yield it, future.result()


# --- writing shards -------------------------------------------------------------------------------

@dataclass
class _Entry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the shard's data file
    nbytes: int


class _Shard:
    """One output shard being written: tensor bytes appended to a data file, the header kept aside."""

    def __init__(self, folder: Path, number: int):
        self.number = number
        self.data_path = folder / f".shard-{number:05d}.data"
        self._fd: int | None = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.entries: list[_Entry] = []
        self.recipes: dict[str, dict] = {}
        self.aliases: dict[str, dict] = {}
        self.size = 0

    def put(self, key: str, dtype: str, shape: tuple[int, ...], data: bytes | np.ndarray | _Source) -> None:
        if isinstance(data, _Source):
            with open(data.file, "rb", buffering=0) as src:
                _copy_bytes(src.fileno(), data.offset, self._fd, data.nbytes)
            n = data.nbytes
        else:
            view = memoryview(data).cast("B")
            _write_all(self._fd, view)
            n = view.nbytes
        self.entries.append(_Entry(key, dtype, tuple(shape), self.size, n))
        self.size += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self, final: Path) -> None:
        """Write `final`: header (entries ordered by alignment, like safetensors), then the data, copied."""
        self.close()
        order = sorted(self.entries, key=lambda e: (-st_header.DTYPES[e.dtype][1], e.key))
        header: dict[str, Any] = {"__metadata__": {
            "compress.format": CODEBOOK_FORMAT, "compress.format_version": str(CODEBOOK_FORMAT_VERSION),
            "compress.tensors": json.dumps(self.recipes, sort_keys=True),
            "compress.aliases": json.dumps(self.aliases, sort_keys=True)}}
        pos = 0
        for e in order:
            header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.data_path, "rb", buffering=0) as src, open(final, "xb", buffering=0) as dst:
            _write_all(dst.fileno(), struct.pack("<Q", len(raw)) + raw)
            for e in order:
                _copy_bytes(src.fileno(), e.offset, dst.fileno(), e.nbytes)
        self.data_path.unlink()


class _Writer:
    """Shards of at most `max_bytes` tensor bytes, filled in order; a codebook and its indices stay together."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: list[_Shard] = []
        self.names: list[str] = []
        self.placed: dict[str, int] = {}  # logical name -> shard number
        self.results: dict[str, _Clustered] = {}
        self.worker_peak = 0

    def shard_for(self, nbytes: int) -> _Shard:
        if not self.shards or (self.shards[-1].size and self.shards[-1].size + nbytes > self.max_bytes):
            self.shards.append(_Shard(self.folder, len(self.shards) + 1))
        return self.shards[-1]

    def put_clustered(self, it: _Item, c: _Clustered) -> _Shard:
        shard = self.shard_for(c.nbytes)
        src = it.source
        shard.put(f"{it.name}.codebook", src.spec.dtype, (c.groups, c.k), c.codebook)
        shard.put(f"{it.name}.indices", "U8", (c.packed.size,), c.packed)
        shard.recipes[it.name] = {"codebook": f"{it.name}.codebook", "indices": f"{it.name}.indices", "bits": c.bits,
                                  "k": c.k, "packing": PACKING, "shape": list(src.spec.shape),
                                  "dtype": str(src.dtype).removeprefix("torch."), "granularity": c.granularity,
                                  "group_size": c.group_size}
        self.results[it.name] = _Clustered(b"", c.groups, c.k, c.bits, c.granularity, c.group_size,
                                           np.zeros(0, np.uint8), c.rms_error, c.max_error, c.peak_rss)
        self.worker_peak = max(self.worker_peak, c.peak_rss)
        return shard

    def put_dense(self, it: _Item) -> _Shard:
        shard = self.shard_for(it.source.nbytes)
        shard.put(it.name, it.source.spec.dtype, it.source.spec.shape, it.source)
        return shard

    def finish(self) -> None:
        n = len(self.shards)
        for shard in self.shards:
            name = f"model-{shard.number:05d}-of-{n:05d}.safetensors"
            shard.finish(self.folder / name)
            self.names.append(name)

    def abort(self) -> None:
        for shard in self.shards:
            shard.close()

    def shard_name(self, name: str) -> str:
        return self.names[self.placed[name] - 1]

    def rows(self, items: list[_Item]) -> list[StreamTensor]:
        by_name = {it.name: it for it in items}
        return [self._row(it, by_name) for it in items]

    def _row(self, it: _Item, by_name: dict[str, _Item]) -> StreamTensor:
        src = it.source or by_name[it.target].source
        shape = src.spec.shape[::-1] if it.transpose and it.source is None else src.spec.shape
        row = StreamTensor(it.name, shape, str(src.dtype).removeprefix("torch."), it.action, it.reason,
                           self.shard_name(it.name), bytes_before=it.source.nbytes if it.source else 0,
                           target=it.target, transpose=it.transpose)
        if it.action == "keep":
            row.bytes_after = src.nbytes
        elif it.action == "cluster":
            c = self.results[it.name]
            itemsize = st_header.DTYPES[src.spec.dtype][1]
            row.bytes_after = c.groups * c.k * itemsize + math.ceil(math.prod(src.spec.shape) * c.bits / 8)
            row.bits, row.k, row.granularity, row.group_size = c.bits, c.k, c.granularity, c.group_size
            row.rms_error, row.max_error = c.rms_error, c.max_error
        return row


def _write_shards(folder: Path, ckpt: _Checkpoint, items: list[_Item], workers: int, max_bytes: int) -> _Writer:
    writer = _Writer(folder, max_bytes)
    aliases_of: dict[str, list[_Item]] = {}
    for it in items:
        if it.action == "alias":
            aliases_of.setdefault(it.target, []).append(it)
    try:
        with _submitter(workers) as submit:
            for it, clustered in _in_order(items, submit, 2 * workers):
                if it.action == "alias":
                    continue
                shard = writer.put_clustered(it, clustered) if clustered is not None else writer.put_dense(it)
                writer.placed[it.name] = shard.number
                for alias in aliases_of.get(it.name, []):  # an alias lives in its target's shard
                    shard.aliases[alias.name] = {"target": it.name, "transpose": alias.transpose}
                    writer.placed[alias.name] = shard.number
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer


def _index_json(written: _Writer, items: list[_Item], cfg: TieConfig, src: Path) -> dict:
    weight_map: dict[str, str] = {}
    for it in items:
        for key in _stored_keys(it):
            weight_map[key] = written.shard_name(it.name)
    return {"metadata": {"total_size": sum(s.size for s in written.shards), "compress.format": CODEBOOK_FORMAT,
                         "compress.format_version": str(CODEBOOK_FORMAT_VERSION),
                         "compress.tensors": {it.name: written.shard_name(it.name) for it in items},
                         "compress.config": cfg.to_dict(), "compress.source": src.name},
            "weight_map": weight_map}


def _codebook_index_tensors(index: Path, weight_map: dict[str, Path]) -> dict[str, str]:
    """logical name -> shard file name, from the index `tie_checkpoint` writes (checked)."""
    meta = json.loads(index.read_text(encoding="utf-8")).get("metadata")
    if not isinstance(meta, dict) or meta.get("compress.format") != CODEBOOK_FORMAT:
        raise BadInputError(f"{index}: not a codebook checkpoint index (no compress.format metadata); it was not "
                            "written by tie_checkpoint (load plain checkpoints with compress.io.load)")
    if meta.get("compress.format_version") != str(CODEBOOK_FORMAT_VERSION):
        raise BadInputError(f"{index}: codebook format version {meta.get('compress.format_version')!r} is not "
                            f"supported (this is {CODEBOOK_FORMAT_VERSION}); re-run tie_checkpoint")
    logical = meta.get("compress.tensors")
    shards = {p.name for p in weight_map.values()}
    if not isinstance(logical, dict) or not all(isinstance(v, str) and v in shards for v in logical.values()):
        raise BadInputError(f"{index}: metadata 'compress.tensors' must map every tensor to a shard of the "
                            "weight_map; the index is corrupt")
    return logical


# --- files and folders ----------------------------------------------------------------------------

def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(fd, view):]


def _copy_bytes(src: int, start: int, dst: int, n: int) -> None:
    """Copy `n` bytes at `start` of `src` to the current position of `dst`, a bounded chunk at a time."""
    done = 0
    while done < n:
        step = min(_COPY_CHUNK, n - done)
        try:
            got = os.copy_file_range(src, dst, step, start + done)
        except (AttributeError, OSError):  # no copy_file_range here, or not across these file systems
            got = 0
        if got == 0:
            chunk = os.pread(src, step, start + done)
            if not chunk:
                raise BadInputError("tensor data ends early (file truncated while being read?)")
            _write_all(dst, chunk)
            got = len(chunk)
        done += got


def _check_out_dir(out_dir: Path, ckpt: _Checkpoint, force: bool) -> None:
    target = out_dir.resolve()
    inputs = [ckpt.path, *dict.fromkeys(s.file for s in ckpt.sources.values())]
    for f in inputs:
        if target in f.resolve().parents:
            raise BadInputError(f"{out_dir}: the output folder would hold the input {f}; choose another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BadInputError(f"{out_dir} exists and is not a folder; choose another output folder")
    if not force:
        raise BadInputError(f"{out_dir} already exists; pass --force to replace it")
    if any(out_dir.iterdir()) and not _is_our_output(out_dir):
        raise BadInputError(f"{out_dir} is not a folder written by tie_checkpoint; refusing to replace it "
                            "(remove it yourself or choose another folder)")


def _is_our_output(folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        meta = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["metadata"]
        return meta.get("compress.format") == CODEBOOK_FORMAT
    return False


def _temp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out_dir.name}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output folder gets the usual mode
    return tmp


def _write_report(path: Path, result: StreamResult) -> None:
    path.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")


def _fsync_all(folder: Path) -> None:
    for p in folder.iterdir():
        _fsync(p)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder onto `out_dir`; an old output (checked earlier) is moved aside first."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{out_dir.name}-", dir=out_dir.parent))
    os.replace(out_dir, old)  # onto the empty folder just made
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["StreamResult", "StreamTensor", "audit_checkpoint", "is_safetensors_checkpoint", "load_sharded",
           "open_checkpoint", "output_dir_for", "tie_checkpoint"]
