"""Structural checks on the zip archives torch writes (`torch.save`, `torch.export.save`, TorchScript).

torch reads these archives with its own zip reader (miniz), we read them with Python's `zipfile`.
To leave no room for the two to see different files, an archive is refused when anything is
unusual: flag bits beyond the ones torch writes, compression other than stored/deflate, duplicate
or escaping names, entries outside one root folder, a CRC mismatch, a compression ratio fit for a
zip bomb. The sizes are bounded before anything is read: torch stores tensors uncompressed, so the
entries may expand to at most `MAX_EXPANSION` times the file (plus `SLACK`), a JSON or pickle entry
(read whole into memory by every reader) to `MAX_METADATA`, and every byte read is counted against
the total the entries declared. Native code (shared libraries by name, or magic bytes at the start
of an entry that is not tensor data) is refused in every archive.
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ...errors import TRUST, BadInputError
from .._errors import library_call

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

# bit 1/2: deflate options, bit 3: sizes in a data descriptor (torch sets it), bit 11: UTF-8 names.
_ALLOWED_FLAGS = 0x0002 | 0x0004 | 0x0008 | 0x0800
_ALLOWED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_MAX_RATIO = 1000
MAX_EXPANSION = 4
SLACK = 16 << 20
MAX_METADATA = 256 << 20
_METADATA_SUFFIXES = (".json", ".pkl", ".py")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".exe", ".o", ".a", ".lib")
_NATIVE_MAGIC = (
    b"\x7fELF",                                  # Linux
    b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf",    # Mach-O 32/64
    b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",                         # Mach-O universal
)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipListing:
    """An archive that passed the checks: its root folder and entries keyed by name below it."""

    root: str
    entries: dict[str, zipfile.ZipInfo]

    def full(self, name: str) -> str:
        return self.root + name


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGIC


def check_archive(path: Path, zf: zipfile.ZipFile) -> ZipListing:
    """Validate every entry of `zf` (opened from `path`); raise BadInputError on the first problem."""
    infos = zf.infolist()
    if not infos:
        raise BadInputError(f"{path}: the zip archive is empty")
    _check_bounds(path, zf, infos)
    seen: set[str] = set()
    for info in infos:
        _check_entry(path, info, seen)
    root = _common_root(path, [i.filename for i in infos])
    budget = _check_sizes(path, infos)
    for info in infos:
        if not info.is_dir():
            budget -= _check_content(path, zf, info, budget)
    entries = {i.filename[len(root):]: i for i in infos if not i.is_dir()}
    return ZipListing(root=root, entries=entries)


def _check_bounds(path: Path, zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """The archive must span the whole file: first entry at byte 0, end record at the very end.

    Python's zipfile tolerates data before and after an archive, and searches backwards for an end
    record, so a truncated `.pt2` whose weights embed a stored torch.save zip opens as that inner zip.
    """
    size = path.stat().st_size
    tail = 22 + len(zf.comment)
    with open(path, "rb") as f:
        f.seek(max(size - tail, 0))
        end = f.read(4)
    if min(i.header_offset for i in infos) != 0 or end != b"PK\x05\x06":
        raise BadInputError(f"{path}: the zip archive does not span the file (truncated, or data before or "
                            "after it); the file is truncated or corrupt")


def _check_entry(path: Path, info: zipfile.ZipInfo, seen: set[str]) -> None:
    name = info.filename
    if info.flag_bits & ~_ALLOWED_FLAGS:
        raise BadInputError(f"{path}: zip entry {name!r} has unsupported flag bits "
                            f"0x{info.flag_bits:04x} (encrypted or non-standard zip); refused (", TRUST,
                            " does not change this)")
    if info.compress_type not in _ALLOWED_COMPRESSION:
        raise BadInputError(f"{path}: zip entry {name!r} uses compression method {info.compress_type}; "
                            "only stored and deflate are read")
    if name in seen:
        raise BadInputError(f"{path}: zip entry {name!r} appears twice; refused")
    seen.add(name)
    parts = PurePosixPath(name).parts
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts
            or (parts and parts[0].endswith(":"))):
        raise BadInputError(f"{path}: zip entry name {name!r} is absolute or escapes the archive; refused")
    deflated = info.compress_type == zipfile.ZIP_DEFLATED
    if deflated and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
        raise BadInputError(f"{path}: zip entry {name!r} expands {info.compress_size} bytes to "
                            f"{info.file_size}; refused as a zip bomb")
    if name.lower().endswith(_NATIVE_SUFFIXES):
        raise BadInputError(f"{path}: zip entry {name!r} is native code (a shared library); refused")


def _common_root(path: Path, names: list[str]) -> str:
    firsts = {n.split("/", 1)[0] for n in names}
    if len(firsts) != 1 or all("/" not in n for n in names):
        raise BadInputError(f"{path}: zip entries are not under one root folder; "
                            "not an archive written by torch")
    return firsts.pop() + "/"


def _check_sizes(path: Path, infos: list[zipfile.ZipInfo]) -> int:
    """The bytes the entries may expand to in all (refusing more than the file size allows)."""
    size = path.stat().st_size
    total = sum(i.file_size for i in infos)
    cap = MAX_EXPANSION * size + SLACK
    if total > cap:
        raise BadInputError(f"{path}: the zip entries expand to {total:,} bytes from a {size:,}-byte file (more than "
                            f"{MAX_EXPANSION}x + {SLACK >> 20} MiB); refused as a zip bomb")
    for info in infos:
        if info.filename.lower().endswith(_METADATA_SUFFIXES) and info.file_size > MAX_METADATA:
            raise BadInputError(f"{path}: zip entry {info.filename!r} is {info.file_size:,} bytes, more than the "
                                f"{MAX_METADATA >> 20} MiB a JSON, pickle or code entry may have; refused")
    return total


def _check_content(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> int:
    """Read the whole entry (zipfile checks its CRC at the end), within `budget` bytes; look at its first bytes.

    Tensor data holds arbitrary bytes (a weight whose first float reads as `\\x7fELF` is still a weight),
    so the magic-byte check is for the entries that are not tensor data.
    """
    read = 0
    with library_call(path, f"reading zip entry {info.filename!r}"), zf.open(info) as f:
        head = f.read(64)
        read = len(head)
        while chunk := f.read(_CHUNK):
            read += len(chunk)
            if read > budget:
                break
    if read > budget or read > info.file_size:
        raise BadInputError(f"{path}: zip entry {info.filename!r} expands past the sizes the archive declares; "
                            "refused as a zip bomb")
    if not _is_tensor_data(info.filename) and (head.startswith(_NATIVE_MAGIC) or _is_pe(head, zf, info)):
        raise BadInputError(f"{path}: zip entry {info.filename!r} is native code (executable magic bytes); "
                            "refused")
    return read


_TENSOR_DATA = re.compile(r"[^/]+/(data|constants|traced_inputs)/\d+\Z|[^/]+/data/(weights|constants)/(weight|tensor)_\d+\Z")


def _is_tensor_data(name: str) -> bool:
    """Entries torch writes raw tensor bytes to (`torch.save`/TorchScript `data/N`, `.pt2` `weight_N`)."""
    return bool(_TENSOR_DATA.match(name))


def _is_pe(head: bytes, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    # "MZ" alone is too common in float data: require the PE header the DOS stub points to.
    if not head.startswith(b"MZ") or len(head) < 64:
        return False
    offset = struct.unpack_from("<I", head, 0x3C)[0]
    if offset + 4 > info.file_size or offset > 1 << 20:
        return False
    with zf.open(info) as f:
        f.read(offset)
        return f.read(4) == b"PE\x00\x00"
