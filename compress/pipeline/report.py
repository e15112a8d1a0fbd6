"""`TieReport`: what `compress tie` did, typed, and written as `<stem>.report.json`.

Sections: the tool and package versions, the input and data files (with sha256), the options
(`TieConfig`, `FinetuneConfig`), the outputs, one row per tensor (action, reason, bits, bytes,
error), sizes, output quality against the original, fine-tuning history, notes (everything that
did not go as asked), the exports and their verification.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..codebook import Codebooks
from ..export.report import ExportReport
from ..records import Record
from ..tying import FinetuneConfig, FinetuneResult, TieConfig, TiePlan
from ..units import format_bytes
from ..verify import VerifyResult
from .assign import QualityRun

REPORT_VERSION = 1


@dataclass
class ToolInfo(Record):
    name: str = "compress"
    version: str | None = None  # the package's version, not a record format version

    @classmethod
    def _check_version(cls, d, where: str) -> None:
        return


@dataclass
class FileInfo(Record):
    """A file read by the run and its content hash."""

    path: str
    sha256: str | None = None
    kind: str | None = None

    _omit_none = True


@dataclass
class TieOptions(Record):
    tie: TieConfig
    finetune: FinetuneConfig | None = None


@dataclass
class Outputs(Record):
    """File names written next to each other in the output folder."""

    model: str
    plan: str
    report: str
    format: str  # "pt2" | "state_dict"
    dynamic_batch: bool | None
    exports: list[str] = field(default_factory=list)


@dataclass
class TensorRow(Record):
    """One parameter: what happened to it; for a clustered one, its bits, bytes and error."""

    name: str
    action: str
    reason: str
    shape: list[int]
    dtype: str
    granularity: str | None = None
    group_size: int | None = None
    k: int | None = None
    bits: int | None = None
    distinct_values: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    bits_per_weight: float | None = None
    max_abs_error: float | None = None
    rel_error: float | None = None
    dim: int | None = None
    outliers: int | None = None

    _omit_none = True

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.action == "cluster":
            d.setdefault("group_size", None)
        return d


@dataclass
class SizeSummary(Record):
    """Bytes as stored: every tensor once, codebooks counted, indices at their packed bit width."""

    before_bytes: int
    after_bytes: int
    ratio: float | None
    bits_per_weight_before: float | None
    bits_per_weight_after: float | None
    tied_weights: int
    tied_bits_per_weight: float | None
    note: str = "bytes as stored: every tensor once, codebooks counted, indices at their packed bit width"


@dataclass
class Quality(Record):
    """Output error of the merged model against the original, on the test (or example) inputs."""

    inputs: str | None = None
    max_abs_error: float | None = None
    mean_cosine: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    mse_before: float | None = None
    mse_after: float | None = None

    _omit_none = True

    def to_dict(self) -> dict:
        return {"inputs": self.inputs} | super().to_dict()


@dataclass
class TieReport(Record):
    """Everything `tie` did, as written to `<stem>.report.json`."""

    tool: ToolInfo
    packages: dict[str, str]
    input: FileInfo
    data: FileInfo | None
    options: TieOptions
    outputs: Outputs
    tensors: list[TensorRow]
    size: SizeSummary
    quality: Quality
    finetune: FinetuneResult | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    exports: list[ExportReport] = field(default_factory=list)
    verification: list[VerifyResult] = field(default_factory=list)
    version: int = REPORT_VERSION
    quality_path: QualityRun | None = None  # error-compensated assignment, refinement (pipeline.assign)

    _what = "tie report"
    _version_required = True
    _version_hint = "re-run `compress tie`"

    def to_dict(self) -> dict:
        d = super().to_dict()
        if d["quality_path"] is None:  # reports of the plain path read as before
            del d["quality_path"]
        return d

    def to_table(self):
        """A rich table: size, bits per weight, output error and accuracy, before and after."""
        return summary_table(self)


def build_report(loaded, data_path, cfg: TieConfig, ft: FinetuneConfig | None, plan: TiePlan,
                 codebooks: Codebooks, originals: dict, before: dict, after: dict, quality: Quality,
                 ft_result: FinetuneResult | None, outputs: Outputs, seconds: float) -> TieReport:
    """The report of a finished run (exports, verification and notes are added by the caller)."""
    return TieReport(
        tool=ToolInfo(version=package_version("compress")),
        packages={"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        input=FileInfo(str(loaded.path), getattr(loaded, "sha256", None) or file_sha256(loaded.path),
                       str(getattr(loaded, "kind", ""))),
        data=None if data_path is None else FileInfo(str(data_path), file_sha256(data_path)),
        options=TieOptions(cfg, ft),
        outputs=outputs,
        tensors=[_tensor_row(t, codebooks, originals) for t in plan.tensors],
        size=_size_section(before, after, plan, codebooks),
        quality=quality,
        finetune=ft_result,
        seconds=round(seconds, 3),
    )


def _tensor_row(t, codebooks: Codebooks, originals: dict[str, torch.Tensor]) -> TensorRow:
    row = TensorRow(t.name, t.action, t.reason, list(t.shape), t.dtype)
    cb = codebooks.tensors.get(t.name)
    if cb is not None:
        w = originals[t.name].double()
        err = cb.decode().double() - w
        norm = float(torch.linalg.vector_norm(w))
        row.granularity, row.group_size, row.k, row.bits = cb.granularity, cb.group_size, cb.k, cb.bits
        row.dim, row.outliers = (cb.dim if cb.dim > 1 else None), (cb.outlier_count or None)
        row.distinct_values = int(torch.unique(cb.decode()).numel())
        row.bytes_before, row.bytes_after = t.numel * cb.codebook.element_size(), cb.packed_bytes()
        row.bits_per_weight = 8 * cb.packed_bytes() / t.numel
        # how far the merged tensor is from the input's (after fine-tuning this includes the training)
        row.max_abs_error = float(err.abs().max())
        row.rel_error = float(torch.linalg.vector_norm(err)) / norm if norm else 0.0
    return row


def _size_section(before: dict, after: dict, plan: TiePlan, codebooks: Codebooks) -> SizeSummary:
    weights = sum(t.numel for t in plan.tensors if not (t.action == "alias" and t.reason.startswith("the same")))
    tied = sum(cb.numel for cb in codebooks.tensors.values())
    tied_bytes = sum(cb.packed_bytes() for cb in codebooks.tensors.values())
    return SizeSummary(
        before_bytes=before["total"], after_bytes=after["total"],
        ratio=before["total"] / after["total"] if after["total"] else None,
        bits_per_weight_before=8 * before["parameters"] / weights if weights else None,
        bits_per_weight_after=8 * (after["parameters"] + after["indices"]) / weights if weights else None,
        tied_weights=tied, tied_bits_per_weight=8 * tied_bytes / tied if tied else None)


def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def file_sha256(path) -> str | None:
    import hashlib

    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summary_table(report: TieReport):
    """Before/after rich table of a tie report: bytes, bits per weight, output error, accuracy."""
    from rich.table import Table

    size, q = report.size, report.quality
    table = Table(title=f"compress tie: {Path(report.input.path).name}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("size", format_bytes(size.before_bytes), format_bytes(size.after_bytes))
    if size.bits_per_weight_before is not None:
        table.add_row("bits per weight (codebooks counted)", f"{size.bits_per_weight_before:.2f}",
                      f"{size.bits_per_weight_after:.2f}")
    if size.tied_bits_per_weight is not None:
        table.add_row("bits per tied weight", "", f"{size.tied_bits_per_weight:.2f} "
                      f"({size.tied_weights:,} weights)")
    if q.inputs:
        table.add_row(f"output max abs error ({q.inputs})", "0", f"{q.max_abs_error:.3g}")
        table.add_row("output mean cosine", "1", f"{q.mean_cosine:.6f}")
    if q.accuracy_before is not None:
        table.add_row("accuracy", f"{q.accuracy_before:.2f}%", f"{q.accuracy_after:.2f}%")
    if q.mse_before is not None:
        table.add_row("reconstruction MSE", f"{q.mse_before:.5f}", f"{q.mse_after:.5f}")
    return table
