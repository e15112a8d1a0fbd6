"""`ExportReport`: what an exporter wrote, tensor by tensor, against the ideal size (the bound).

The bound of a merged tensor is `ceil(n * bits / 8)` bytes of indices plus its codebook bytes; the
bound of the file adds every dense tensor (each once) and the graph. The difference between the
file and the bound is what storage choices cost: a sub-byte width ONNX has no type for stored in
the next type up, padding, the constants of an in-graph unpack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import Record

REPORT_VERSION = 1
BOUND_VERSION = 1


@dataclass
class TensorEntry(Record):
    """One tensor of the exported file."""

    name: str
    shape: list[int]
    storage: str  # "codebook" | "dense" | "alias" | "unused" (a merged tensor the graph does not read)
    actual_bytes: int  # data bytes this tensor adds to the file
    bound_bytes: int  # the ideal: packed indices + codebook (dense: its data)
    index_type: str | None = None  # "UINT4", "UINT8", "packed3", "U8 packed3" ...
    bits: int | None = None
    k: int | None = None
    granularity: str | None = None
    stored_as: list[str] = field(default_factory=list)  # names in the file (initializers / tensors)
    note: str = ""
    dense_bytes: int = 0  # a merged tensor stored dense where the report cannot point at it: its dense size
    widened_bytes: int = 0  # indices stored wider than planned (a fallback): the bytes that costs

    _what = "export tensor"


@dataclass
class Loss(Record):
    """A merged tensor the file does not keep compact, and what that costs."""

    name: str
    kind: str  # "dense" | "widened"
    bytes: int  # more than its compressed form
    reason: str = ""

    _what = "export loss"

    def text(self, file: str) -> str:
        """One line for the terminal and the report's notes."""
        what = ("is stored dense, not as codebook + indices" if self.kind == "dense"
                else "has its indices stored wider than their bits")
        why = f" ({self.reason})" if self.reason else ""
        return f"`{self.name}` {what} in {file}: {self.bytes:,} bytes more than its compressed form{why}"


@dataclass
class SizeBound(Record):
    """The independent bound of a file, in bytes, by part (`total` is their sum); see `export.bound`."""

    index_bytes: int
    codebook_bytes: int
    scale_bytes: int
    dense_bytes: int
    graph_bytes: int
    fp32_file_bytes: int | None = None  # the plain fp32 export the graph bytes were measured on
    note: str = ""
    version: int = BOUND_VERSION

    _what = "size bound"
    _derived = ("total",)

    @property
    def total(self) -> int:
        return self.index_bytes + self.codebook_bytes + self.scale_bytes + self.dense_bytes + self.graph_bytes


@dataclass
class ExportReport(Record):
    """Result of `export_onnx` / `export_safetensors` / `tie_onnx`: sizes, storage per tensor, notes."""

    format: str  # "onnx" | "safetensors"
    path: str
    file_bytes: int  # every file written (model + external data)
    graph_bytes: int  # everything that is not tensor data
    dense_reference_bytes: int  # the same model with every merged tensor dense (before the rewrite)
    tensors: list[TensorEntry] = field(default_factory=list)
    dedup_count: int = 0
    dedup_saved_bytes: int = 0
    files: list[str] = field(default_factory=list)
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
    independent_bound: SizeBound | None = None  # from the plan and the model, not from this file
    version: int = REPORT_VERSION

    _what = "export report"
    _version_required = True
    _derived = ("bound_bytes",)

    @property
    def bound_bytes(self) -> int:
        return sum(t.bound_bytes for t in self.tensors) + self.graph_bytes

    @property
    def ratio_to_bound(self) -> float:
        return self.file_bytes / max(self.bound_bytes, 1)

    @property
    def vs_bound(self) -> float:
        """The file against the independent bound when there is one, else against its own (`bound_bytes`)."""
        if self.independent_bound is not None and self.independent_bound.total:
            return self.file_bytes / self.independent_bound.total
        return self.ratio_to_bound

    @property
    def ratio_to_dense(self) -> float:
        return self.file_bytes / max(self.dense_reference_bytes, 1)

    def entry(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def losses(self) -> list[Loss]:
        """Merged tensors the file does not keep compact: stored dense, or indices wider than planned."""
        out = []
        for t in self.tensors:
            if t.k is None:
                continue
            if t.storage == "dense":
                out.append(Loss(t.name, "dense", max(t.actual_bytes + t.dense_bytes - t.bound_bytes, 0), t.note))
            elif t.storage == "codebook" and t.widened_bytes:
                out.append(Loss(t.name, "widened", t.widened_bytes, t.note))
        return out

    def left_dense(self) -> list[TensorEntry]:
        """Dense tensors with a note saying why (merged weights that could not be located, ...)."""
        return [t for t in self.tensors if t.storage == "dense" and t.note]

    def to_table(self):
        """A rich Table: one row per tensor, then the totals."""
        from rich.table import Table

        table = Table(title=f"{self.path} ({self.format})")
        for col in ("tensor", "shape", "storage", "index", "bytes", "bound", "note"):
            table.add_column(col, justify="right" if col in ("bytes", "bound") else "left")
        for t in self.tensors:
            index = f"{t.index_type} (K={t.k})" if t.index_type else ""
            table.add_row(t.name, "x".join(map(str, t.shape)) or "scalar", t.storage, index,
                          f"{t.actual_bytes:,}", f"{t.bound_bytes:,}", t.note)
        table.add_row("graph", "", "", "", f"{self.graph_bytes:,}", f"{self.graph_bytes:,}", "")
        table.add_row("total", "", "", "", f"{self.file_bytes:,}", f"{self.bound_bytes:,}",
                      f"{self.ratio_to_bound:.3f}x bound, {self.ratio_to_dense:.3f}x dense", style="bold")
        b = self.independent_bound
        if b is not None:
            table.add_row("independent bound", "", "", "", "", f"{b.total:,}",
                          f"{self.vs_bound:.3f}x: indices {b.index_bytes:,} + codebooks {b.codebook_bytes:,} + "
                          f"dense tensors {b.dense_bytes:,} + fp32 graph {b.graph_bytes:,}"
                          + (f"; {b.note}" if b.note else ""), style="bold")
        if self.dedup_count:
            table.caption = f"deduplicated {self.dedup_count} tensors, saved {self.dedup_saved_bytes:,} bytes"
        return table
