"""The audit report as tables: rich (terminal) and GitHub-flavoured markdown, the same sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..units import format_bytes, format_iec

if TYPE_CHECKING:
    from .report import AuditReport, RowRepeats, TensorAudit


def render_table(r: AuditReport, top: int | None = None):
    """A rich renderable: tensors by size, ties, totals, largest savings (`top` rows per list)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = [Text(_headline(r), style="bold")]
    for sec in _sections(r, top):
        table = Table(title=sec.title, title_justify="left", title_style="bold", caption=sec.caption,
                      caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for head, just, width in zip(sec.headers, sec.justify, _min_widths(sec)):
            table.add_column(head, justify="right" if just == "r" else "left", overflow="fold",
                             no_wrap=just == "r", min_width=width, style="cyan" if just == "c" else None)
        for row in sec.rows:
            table.add_row(*row)
        parts += [Text(""), table]
    return Group(*parts)


def render_markdown(r: AuditReport, top: int | None = None) -> str:
    """The same sections as GitHub-flavoured markdown, for CI summaries."""
    out = [f"**{_headline(r)}**", ""]
    for sec in _sections(r, top):
        out += [f"### {sec.title}", "", "| " + " | ".join(sec.headers) + " |",
                "|" + "|".join("---:" if j == "r" else "---" for j in sec.justify) + "|"]
        out += ["| " + " | ".join(_md_cell(c, j) for c, j in zip(row, sec.justify)) + " |"
                for row in sec.rows]
        out += (["", f"_{sec.caption}_"] if sec.caption else []) + [""]
    return "\n".join(out)


@dataclass
class _Section:
    title: str
    headers: list[str]
    justify: str  # one letter per column: "l" text, "c" a tensor name (code in markdown), "r" numbers
    rows: list[list[str]]
    caption: str | None = None


def _min_widths(sec: _Section) -> list[int]:
    # names fold rather than vanish; numbers never wrap
    widths = []
    for i, just in enumerate(sec.justify):
        longest = max((len(row[i]) for row in sec.rows), default=0)
        widths.append(min(longest, 50) if just == "c" else min(longest, 9) if just == "l" else 0)
    return widths


def _headline(r: AuditReport) -> str:
    t = r.totals
    file = f"; file {format_bytes(r.file_bytes)}" if r.file_bytes is not None else ""
    return (f"{r.path} ({r.kind}): {t.tensors} tensors, {t.parameters:,} parameters, "
            f"{format_bytes(t.bytes)} of tensor data{file}; tolerance {r.config.tolerance:g}; "
            f"{r.seconds:.2f} s")


def _sections(r: AuditReport, top: int | None) -> list[_Section]:
    secs = [_onnx_section(r, top)] if r.onnx is not None else []
    secs.append(_tensor_section(r, top))
    if r.ties:
        secs.append(_tie_section(r, top))
    secs.append(_totals_section(r))
    if r.savings:
        secs.append(_savings_section(r, top))
    return secs


def _limit(items: list, top: int | None, what: str) -> tuple[list, str | None]:
    if top is None or len(items) <= top:
        return items, None
    return items[:top], f"{len(items) - top} more {what} not shown"


def _tensor_section(r: AuditReport, top: int | None) -> _Section:
    bits = r.config.bits
    rows, more = _limit(sorted(r.tensors, key=lambda t: (-t.bytes, t.name)), top, "tensors")
    headers = ["tensor", "shape", "dtype", "size", "unique", "groups", "entropy",
               *(f"RMS @{b}" for b in bits), "rows repeated", "note"]
    body = []
    for t in rows:
        merges = [t.merge_at(b) for b in bits]
        body.append([t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, format_iec(t.bytes),
                     _num(t.unique), _num(t.groups),
                     "-" if t.entropy_bits is None else f"{t.entropy_bits:.2f}"]
                    + ["-" if m is None else f"{m.rms_error:.1e}" for m in merges]
                    + [_rows_text(t.rows), _note(t)])
    tol = f"{r.config.tolerance:g}"
    caption = (f"groups: fewest shared values keeping every value within {tol}; entropy: bits per weight "
               f"of those groups; RMS @b: error of a hard merge to b-bit indices; rows repeated: rows "
               f"within {tol} of another row; kept: under {r.config.min_size:,} elements, not merged in "
               "the totals.")
    return _Section("Tensors, largest first", headers, "cllrrrr" + "r" * len(bits) + "rl", body,
                    caption if more is None else f"{more}. {caption}")


def _onnx_section(r: AuditReport, top: int | None) -> _Section:
    storage = r.onnx
    items, more = _limit(sorted(storage.initializers, key=lambda i: (-i.bytes, i.name)), top, "initializers")
    body = []
    for i in items:
        if i.storage == "index":
            what = f"index, {i.bits:g} bits" if i.bits is not None else "index"
        elif i.storage == "codebook":
            what = "codebook"
        else:
            what = i.storage
        into = ", ".join(i.decodes[:2]) + (f" (+{len(i.decodes) - 2})" if len(i.decodes) > 2 else "")
        body.append([i.name, "x".join(map(str, i.shape)) or "scalar", i.dtype, format_iec(i.bytes), what, into])
    caption = (f"dense {format_bytes(storage.dense_bytes)}, codebooks {format_bytes(storage.codebook_bytes)}, "
               f"indices {format_bytes(storage.index_bytes)}; {len(storage.decoded)} weights decoded in the graph "
               "(Gather from a codebook by stored indices); bits: index bytes per decoded element")
    return _Section("ONNX storage: each initializer dense, or decoded from a codebook", ["initializer", "shape",
                    "dtype", "size", "storage", "decodes into"], "cllrll", body,
                    caption if more is None else f"{more}. {caption}")


def _num(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _rows_text(rows: RowRepeats | None) -> str:
    if rows is None:
        return "-"
    return f"{'' if rows.exhaustive else '>='}{rows.count:,}/{rows.rows:,}"


def _note(t: TensorAudit) -> str:
    if t.note:
        return t.note
    return "" if t.mergeable else "kept"


def _tie_section(r: AuditReport, top: int | None) -> _Section:
    size = {t.name: t.bytes for t in r.tensors}
    ties, caption = _limit(r.ties, top, "ties")
    body = [[t.a, t.b, t.kind, f"{t.rel_error:.2e}",
             "already shared" if t.kind == "shared" else format_iec(size.get(t.b, 0))] for t in ties]
    return _Section("Tensors that are, or could be, one storage",
                    ["kept", "tied", "kind", "rel. error", "copy size"], "cclrr", body, caption)


def _totals_section(r: AuditReport) -> _Section:
    t = r.totals
    body = [["now", format_bytes(t.bytes), "1.00x", "-", "-"]]
    if t.tie_saved_bytes:
        now = t.bytes - t.tie_saved_bytes
        body.append(["  duplicates stored once", format_bytes(now), _ratio(t.bytes, now), "-", "0"])
    for p in t.projected:
        body.append([f"merged to {p.bits} bits", format_bytes(p.bytes), _ratio(t.bytes, p.bytes),
                     f"{p.merged_tensors:,}", f"{p.rms_error:.2e}"])
        if p.bytes_with_ties != p.bytes:
            body.append(["  and duplicates stored once", format_bytes(p.bytes_with_ties),
                         _ratio(t.bytes, p.bytes_with_ties), "", ""])
    caption = (f"Float tensors of at least {r.config.min_size:,} elements are merged where it saves bytes; "
               "codebook + packed indices; RMS error over the merged tensors.")
    return _Section("Totals (shared storage counted once)", ["", "bytes", "smaller by", "tensors merged",
                                                              "RMS error"], "lrrrr", body, caption)


def _ratio(now: int, new: int) -> str:
    return f"{now / new:.2f}x" if new else "-"


def _savings_section(r: AuditReport, top: int | None) -> _Section:
    bits = r.config.bits
    items, caption = _limit(r.savings, top, "savings")
    body = [[s.kind if s.kind == "merge" else f"tie ({s.detail})",
             s.names[0] if s.kind == "merge" else f"{s.names[1]} -> {s.names[0]}"]
            + [format_iec(s.bytes_saved.get(b, 0)) for b in bits] for s in items]
    return _Section("Largest savings first", ["action", "tensor"] + [f"saves at {b}-bit" for b in bits],
                    "lc" + "r" * len(bits), body, caption)


def _md_cell(text: str, just: str) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if just == "c" and text else text
