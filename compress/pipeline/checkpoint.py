"""Checkpoints bigger than memory: post-training tie of (sharded) safetensors, tensor by tensor.

`tie_checkpoint(index_or_file, out_dir, cfg)` clusters a `.safetensors` file or a sharded
`*.safetensors.index.json` checkpoint without ever holding it: every tensor is read through a
memory map opened for that tensor alone (`compress.io.checkpoint`), clustered by the same core as
the in-memory path (`tying.cluster`: `decide`, `cluster_tensor`, nearest-value assignment), and
streamed into output shards on disk (`compress.export.sharded`). Independent tensors are clustered
by a pool of worker processes (`workers`); at most `2 * workers` tensors are in flight. Peak memory
is a small multiple of the largest tensor, whatever the size of the checkpoint. by_type overrides
need module types, which a checkpoint does not have; tensor-level ties cost one extra read of the
candidates. Non-float, small and excluded tensors are copied byte for byte. The output does not
depend on the number of workers.

Output folder (it appears complete or not at all: written into a temporary folder next to it,
renamed into place at the end): `model-0000i-of-0000N.safetensors` shards in the codebook format,
`model.safetensors.index.json` (Hugging Face `weight_map`, plus `compress.*` metadata: format,
every logical tensor's shard, the config and the source) and `stream.report.json` (`StreamResult`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import TMP_PREFIX, fsync, record_written, write_error
from ..auditing import AuditConfig, AuditReport, audit, find_tensor_ties
from ..codebook import FILE_FORMAT
from ..errors import BadInputError, Option
from ..export.sharded import INDEX_NAME, ShardWriter
from ..io.checkpoint import Checkpoint, CheckpointTensors, TensorSource, open_checkpoint
from ..io.safetensors import DTYPES
from ..records import Record
from ..tying import Settings, TieConfig, decide
from ..units import format_iec
from .workers import WORKER_BASE, WORKER_BYTES, Clustered, Job, in_order, peak_rss, submitter

STREAM_VERSION = 1
REPORT_NAME = "stream.report.json"
DEFAULT_SHARD_BYTES = 1 << 30


# --- results --------------------------------------------------------------------------------------

@dataclass
class StreamTensor(Record):
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

    _what = "stream tensor"


@dataclass
class StreamResult(Record):
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

    _what = "stream result"
    _version_required = True
    _version_hint = "re-run tie_checkpoint"

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


# --- entry points --------------------------------------------------------------------------------

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

    Example::

        r = tie_checkpoint("ckpt/model.safetensors.index.json", "ckpt.tied", TieConfig(bits=4), workers=4)
    """
    started = time.perf_counter()
    cfg = cfg or TieConfig()
    _check_config(cfg)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise BadInputError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    src, out_dir = Path(index_or_file), Path(out_dir)
    ckpt = Checkpoint.open(src)
    ckpt.refuse_codebook_input()
    _check_out_dir(out_dir, ckpt, force)
    items = _plan(ckpt, cfg)
    _check_stored_names(items, src)
    n_workers = _worker_count(workers, items)
    try:
        tmp = _temp_dir(out_dir)
    except OSError as e:
        raise write_error(out_dir.parent, e) from e
    try:
        writer, done = _write_shards(tmp, items, n_workers, max_shard_bytes)
        index = writer.index_json({"compress.config": cfg.to_dict(), "compress.source": src.name})
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        rows = [_row(it, items, writer, done) for it in items]
        files = sum(p.stat().st_size for p in tmp.iterdir())
        peak = max((c.peak_rss for c in done.values()), default=0)
        result = StreamResult(str(src), str(out_dir), INDEX_NAME, writer.names, cfg.to_dict(), n_workers, rows,
                              sum(s.nbytes for s in ckpt.sources.values()), sum(r.bytes_after for r in rows),
                              files, peak_rss(), peak, round(time.perf_counter() - started, 3))
        _write_report(tmp / REPORT_NAME, result)
        _fsync_all(tmp)
        _move_into_place(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record_written(out_dir)
    return result


def audit_checkpoint(path: str | Path, cfg: AuditConfig | None = None, *, progress: bool | None = None
                     ) -> AuditReport:
    """`audit` of a (sharded) safetensors checkpoint with memory bounded by its largest tensor.

    Example::

        audit_checkpoint("ckpt/model.safetensors.index.json").totals.bytes
    """
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


# --- what happens to each tensor ------------------------------------------------------------------

@dataclass
class _Item:
    name: str
    action: str  # "cluster" | "keep" | "alias"
    reason: str
    source: TensorSource | None = None  # its bytes in the input (None for a name sharing another's storage)
    settings: Settings | None = None  # for "cluster"
    target: str | None = None
    transpose: bool = False


def _check_config(cfg: TieConfig) -> None:
    if cfg.importance:
        raise BadInputError("importance weighting needs a model and calibration data; a checkpoint is tied "
                            "post-training only (drop ", Option("importance"), ", or tie a model file)")
    if cfg.by_type:
        raise BadInputError(f"by_type overrides ({', '.join(cfg.by_type)}) need module types, which a "
                            "safetensors checkpoint does not have; use by_name globs instead")


def _plan(ckpt: Checkpoint, cfg: TieConfig) -> list[_Item]:
    """Each tensor's action by `plan`'s own rules (no module types: the fallback rule), ties included."""
    items: dict[str, _Item] = {}
    for name, src in ckpt.sources.items():
        meta = torch.empty(src.spec.shape, dtype=src.dtype, device="meta")
        d = decide(name, meta, None, cfg)
        items[name] = _Item(name, d.action, d.reason, src, d.settings)
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


def _tensor_ties(ckpt: Checkpoint, items: dict[str, _Item], cfg: TieConfig) -> dict[str, tuple[str, bool, str]]:
    """`plan._plan_ties` over the clustering candidates, read one at a time: b -> (a, transpose, kind)."""
    names = [n for n, it in items.items() if it.action == "cluster"]
    if len(names) < 2:
        return {}
    sub = Checkpoint(ckpt.path, {n: ckpt.sources[n] for n in names}, {}, ckpt.metadata)
    ties: dict[str, tuple[str, bool, str]] = {}
    taken: set[str] = set()
    for tie in find_tensor_ties(CheckpointTensors(sub), cfg.tie_tolerance):
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
                                    f"stored as {key!r}; rename one, or pass ", Option("exclude", it.name, many=True))
            owner[key] = it.name


def _worker_count(workers: int | None, items: list[_Item]) -> int:
    """The number asked for, or every core, as many as available memory holds (see `_WORKER_BYTES`)."""
    jobs = [it.source.spec.shape for it in items if it.action == "cluster"]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        need = WORKER_BASE + WORKER_BYTES * max((math.prod(s) for s in jobs), default=0)
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


# --- writing ---------------------------------------------------------------------------------------

def _write_shards(folder: Path, items: list[_Item], workers: int, max_bytes: int
                  ) -> tuple[ShardWriter, dict[str, Clustered]]:
    writer = ShardWriter(folder, max_bytes)
    aliases_of: dict[str, list[_Item]] = {}
    for it in items:
        if it.action == "alias":
            aliases_of.setdefault(it.target, []).append(it)
    done: dict[str, Clustered] = {}
    jobs = [(it, Job(it.name, str(it.source.file), it.source.stored, it.settings) if it.action == "cluster"
             else None) for it in items if it.action != "alias"]
    try:
        with submitter(workers) as submit:
            for it, c in in_order(jobs, submit, 2 * workers):
                if c is None:
                    writer.put_dense(it.name, it.source)
                else:
                    writer.put_codebook(it.name, it.source.spec.dtype, it.source.spec.shape, c.codebook, c.groups,
                                        c.k, c.bits, c.packed, c.grain)
                    done[it.name] = c.summary()
                for alias in aliases_of.get(it.name, []):  # an alias lives in its target's shard
                    writer.put_alias(alias.name, it.name, alias.transpose)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer, done


def _row(it: _Item, items: list[_Item], writer: ShardWriter, done: dict[str, Clustered]) -> StreamTensor:
    src = it.source or next(x for x in items if x.name == it.target).source
    shape = src.spec.shape[::-1] if it.transpose and it.source is None else src.spec.shape
    row = StreamTensor(it.name, shape, str(src.dtype).removeprefix("torch."), it.action, it.reason,
                       writer.shard_name(it.name), bytes_before=it.source.nbytes if it.source else 0,
                       target=it.target, transpose=it.transpose)
    if it.action == "keep":
        row.bytes_after = src.nbytes
    elif it.action == "cluster":
        c = done[it.name]
        itemsize = DTYPES[src.spec.dtype][1]
        row.bytes_after = c.groups * c.k * itemsize + math.ceil(math.prod(src.spec.shape) * c.bits / 8)
        row.bits, row.k, row.granularity, row.group_size = c.bits, c.k, c.grain.kind, c.grain.group_size
        row.rms_error, row.max_error = c.rms_error, c.max_error
    return row


def _check_out_dir(out_dir: Path, ckpt: Checkpoint, force: bool) -> None:
    target = out_dir.resolve()
    inputs = [ckpt.path, *dict.fromkeys(s.file for s in ckpt.sources.values())]
    for f in inputs:
        if target in f.resolve().parents:
            raise BadInputError(f"{out_dir}: the output folder would hold the input {f}; choose another folder")
    if out_dir.is_symlink():  # renaming onto a link replaces the link, or fails: never writes through it
        raise BadInputError(f"{out_dir} is a symbolic link; give the output folder's real path")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BadInputError(f"{out_dir} exists and is not a folder; choose another output folder")
    if not force:
        raise BadInputError(f"{out_dir} already exists; pass ", Option("force", True), " to replace it")
    if any(out_dir.iterdir()) and not _is_our_output(out_dir):
        raise BadInputError(f"{out_dir} is not a folder written by tie_checkpoint; refusing to replace it "
                            "(remove it yourself or choose another folder)")


def _is_our_output(folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        meta = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["metadata"]
        return meta.get("compress.format") == FILE_FORMAT
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
        fsync(p)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder onto `out_dir`; an old output (checked earlier) is moved aside first."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{out_dir.name}-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old)  # onto the empty folder just made
    except OSError:
        shutil.rmtree(old, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)  # put the earlier output back
        raise
    shutil.rmtree(old, ignore_errors=True)
