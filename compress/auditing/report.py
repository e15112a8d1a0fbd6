"""The audit's records: what it measures (`AuditConfig`) and what it found (`AuditReport`).

The JSON form (`to_dict`/`to_json`) is documented field by field in docs/audit-json.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..errors import BadInputError, Option
from ..records import Record
from .onnx import OnnxStorage

REPORT_VERSION = 1
CONFIG_VERSION = 1
TIE_KINDS = ("shared", "exact", "transposed", "near")


@dataclass(frozen=True)
class AuditConfig(Record):
    """What `audit` measures.

    Attributes:
        tolerance: absolute value tolerance (default 1e-3). Values within it of a shared centre
            count as one group; two rows repeat each other when no element differs by more. Trained
            weights typically have a standard deviation of 0.01-0.1 (all-MiniLM-L6-v2: 0.04-0.1), so
            1e-3 is about 1-10% of it; the report lists each tensor's std to judge it by.
        tie_tolerance: largest *relative* error ||a - b|| / max(||a||, ||b||) under which two tensors
            count as copies (the meaning `TieConfig.tie_tolerance` has).
        bits: index widths to project a hard merge at (each 1..16): 2**bits shared values per tensor.
        min_size: float tensors with fewer elements are kept as they are in the projected totals
            (biases and norms are small; merging them costs accuracy and saves little).
        row_pair_budget: most candidate row pairs examined per tensor when looking for repeated
            rows; when it runs out the count is a lower bound (`exhaustive: false`).
        examples: how many examples to keep per finding.

    >>> AuditConfig.from_dict({"tolerance": 0.01, "bits": [4]}).bits
    (4,)
    """

    tolerance: float = 1e-3
    tie_tolerance: float = 1e-3
    bits: tuple[int, ...] = (8, 4, 2)
    min_size: int = 1024
    row_pair_budget: int = 2_000_000
    examples: int = 3
    version: int = CONFIG_VERSION

    _what = "audit config"

    def __post_init__(self) -> None:
        for key in ("tolerance", "tie_tolerance"):
            tol = getattr(self, key)
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
                raise BadInputError("audit config: ", Option(key), f" must be a finite number >= 0, got {tol!r}")
            object.__setattr__(self, key, float(tol))
        bits = tuple(self.bits) if isinstance(self.bits, (list, tuple)) else None
        if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16 for b in bits):
            raise BadInputError(
                f"audit config: bits must be a non-empty list of integers 1..16, got {self.bits!r}")
        for key in ("min_size", "row_pair_budget", "examples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadInputError(f"audit config: {key} must be an integer >= 0, got {value!r}")
        if self.version != CONFIG_VERSION:
            raise BadInputError(
                f"audit config: version {self.version!r} is not supported (this is {CONFIG_VERSION})")
        object.__setattr__(self, "bits", tuple(sorted(set(bits), reverse=True)))


@dataclass
class MergeEstimate(Record):
    """A hard merge of one tensor to `bits`-bit indices: `centers` shared values (k-means, <= 2**bits)."""

    bits: int
    centers: int
    index_bits: int
    bytes: int
    rms_error: float
    max_error: float
    values: list[float] | None = None


@dataclass
class RowRepeats(Record):
    """Rows (first-axis slices) of one tensor that repeat another row to within the tolerance."""

    rows: int
    row_size: int
    count: int
    exhaustive: bool
    examples: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass
class TensorAudit(Record):
    """Everything the audit measured about one named tensor (`None` where it does not apply)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    parameters: int
    bytes: int
    unique: int | None = None
    nonfinite: int = 0
    min: float | None = None
    max: float | None = None
    std: float | None = None
    groups: int | None = None
    entropy_bits: float | None = None
    merges: list[MergeEstimate] = field(default_factory=list)
    rows: RowRepeats | None = None
    mergeable: bool = False
    shared_with: str | None = None
    note: str | None = None

    def merge_at(self, bits: int) -> MergeEstimate | None:
        return next((m for m in self.merges if m.bits == bits), None)

    def projected_bytes(self, bits: int) -> int:
        """Bytes at `bits` in the projected totals: merged when mergeable and smaller, else as now."""
        m = self.merge_at(bits)
        return min(self.bytes, m.bytes) if self.mergeable and m is not None else self.bytes


@dataclass(frozen=True)
class TensorTie(Record):
    """Tensor `b` is (or could be) stored as tensor `a`.

    `kind`: "shared" (already one storage), "exact" (identical values), "transposed" (b == a.T
    to within the tolerance), "near" (same shape, within the tolerance). `rel_error` is
    ||a - b|| / max(||a||, ||b||) (with b transposed for "transposed").
    """

    a: str
    b: str
    kind: str
    rel_error: float


@dataclass
class ProjectedSize(Record):
    """Stored bytes if every mergeable tensor were merged to `bits` (and, with ties, duplicates dropped)."""

    bits: int
    bytes: int
    bytes_with_ties: int
    merged_tensors: int
    rms_error: float


@dataclass
class AuditTotals(Record):
    """Counts and bytes over the whole model (shared storage once), and the projections per bit width."""

    tensors: int
    stored_tensors: int
    parameters: int
    bytes: int
    tie_saved_bytes: int
    projected: list[ProjectedSize]


@dataclass
class Saving(Record):
    """One action and the bytes it saves at each bit width (merges and ties add up to the totals)."""

    kind: str
    names: list[str]
    detail: str
    bytes_saved: dict[int, int]


@dataclass
class AuditReport(Record):
    """The result of `audit`: per-tensor rows (in the file's order), ties, totals and savings."""

    path: str
    kind: str
    file_bytes: int | None
    config: AuditConfig
    tensors: list[TensorAudit]
    ties: list[TensorTie]
    totals: AuditTotals
    savings: list[Saving]
    seconds: float
    onnx: OnnxStorage | None = None  # for an ONNX file: how each initializer is stored (dense / codebook)
    version: int = REPORT_VERSION

    _what = "audit report"
    _version_required = True
    _version_hint = "re-run `compress audit`"

    def to_json(self) -> str:
        """The JSON documented in docs/audit-json.md (no NaN or infinity in it)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_table(self, top: int | None = None):
        """A rich renderable: tensors by size, ties, totals, largest savings (`top` rows per list)."""
        from .tables import render_table

        return render_table(self, top)

    def to_markdown(self, top: int | None = None) -> str:
        """The same sections as GitHub-flavoured markdown, for CI summaries."""
        from .tables import render_markdown

        return render_markdown(self, top)
