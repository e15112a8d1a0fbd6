"""Bytes on disk: fp32 vs the toolkit's ONNX and safetensors, the ideal bound, and general compressors.

For the four digits samples and MiniLM (sentence embedder): the fp32 ONNX (same dynamo export
settings as the toolkit's), fp32 safetensors (`safetensors.torch.save_model`), the toolkit's ONNX and
safetensors at `TieConfig(bits=4)` (see `_artifacts.py`), the toolkit's ORT-format file
(`compress.export.ort.export_ort`) beside what onnxruntime's own converter makes of the same ONNX with
its defaults (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, which folds the decode into
dense weights), the bound the exporters report (indices at ceil(n * bits / 8) bytes + codebooks +
every dense tensor once + the graph), and what gzip (level 6) and zstd (level 19, when the
`zstandard` module is importable) make of each file.

    python bench/storage.py          # ~2 min on 2 cores
    python bench/storage.py --quick  # the digits samples only
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import onnx

GZIP_LEVEL = 6
ZSTD_LEVEL = 19


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL)


def sizes(path: Path, zstd) -> dict:
    data = Path(path).read_bytes()
    return {"bytes": len(data), "gzip": len(gzip.compress(data, GZIP_LEVEL)),
            "zstd": None if zstd is None else len(zstd.compress(data))}


def ort_files(onnx_path: Path, folder: Path) -> dict[str, Path]:
    """The toolkit's `.ort` of `onnx_path`, and onnxruntime's converter's with its default settings."""
    from compress.export.ort import export_ort

    ours = folder / f"{onnx_path.stem}.compress.ort"
    export_ort(onnx_path, ours, force=True)
    default_dir = folder / "ort-default"
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
                    "--output_dir", str(default_dir)], check=True, capture_output=True)
    return {"ours ort": ours, "converter ort": next(default_dir.glob("*.ort"))}


def measure(b, zstd) -> dict:
    files = {"fp32 onnx": b.fp32_onnx, "fp32 safetensors": b.fp32_safetensors, "ours onnx": b.onnx,
             "ours safetensors": b.safetensors, **ort_files(b.onnx, b.onnx.parent)}
    out = {k: sizes(p, zstd) for k, p in files.items()}
    # the bound, computed here from the codebooks and the model (not from the exporters' own accounting)
    out["bound"] = b.packed_bytes + b.dense_bytes
    out["packed"] = b.packed_bytes
    out["dense"] = b.dense_bytes
    out["exporter bound"] = {"onnx": b.onnx_report.bound_bytes, "safetensors": b.st_report.bound_bytes}
    out["clustered"] = {"tensors": b.clustered, "numel": b.clustered_numel, "of_total": b.total_numel}
    out["left_dense"] = [t.name for t in b.onnx_report.left_dense()]
    out["onnx nodes"] = len(onnx.load(str(b.onnx), load_external_data=False).graph.node)
    return out


def tables(results: dict, zstd_ok: bool) -> list[C.Table]:
    main = C.Table("storage", "Bytes on disk at 4 bits per clustered weight (TieConfig(bits=4)): files, ratios, bound",
                   ["model", "clustered", "fp32 ONNX", "ours ONNX", "fp32/ours", "fp32 safetensors",
                    "ours safetensors", "fp32/ours", "ours .ort", "converter .ort", "bound", "ONNX/bound",
                    "safetensors/bound", "ONNX nodes"])
    for name, r in results.items():
        c = r["clustered"]
        main.add(name, f"{c['numel'] / c['of_total']:.1%} of {c['of_total']:,}",
                 C.fmt_bytes(r["fp32 onnx"]["bytes"]), C.fmt_bytes(r["ours onnx"]["bytes"]),
                 f"{r['fp32 onnx']['bytes'] / r['ours onnx']['bytes']:.2f}x",
                 C.fmt_bytes(r["fp32 safetensors"]["bytes"]), C.fmt_bytes(r["ours safetensors"]["bytes"]),
                 f"{r['fp32 safetensors']['bytes'] / r['ours safetensors']['bytes']:.2f}x",
                 C.fmt_bytes(r["ours ort"]["bytes"]), C.fmt_bytes(r["converter ort"]["bytes"]), C.fmt_bytes(r["bound"]),
                 f"{r['ours onnx']['bytes'] / r['bound']:.3f}", f"{r['ours safetensors']['bytes'] / r['bound']:.3f}",
                 r["onnx nodes"])
    main.notes = [("'clustered': share of the parameters that got a codebook (the rest stay fp32: biases, norms, "
                  "tensors under 1,024 elements). Bound: every merged tensor at ceil(n*bits/8) index bytes + its fp32 "
                  "codebook, plus every other tensor of the model once, computed from the codebooks and the model "
                  "(not from the exporters' reports); a file's excess over it is its graph or header and any padding "
                  "(small models with many nodes, like the unrolled GRU, pay most). An ONNX file can come in under the bound when the graph "
                  "drops a tensor the output does not use: MiniLM's pooler. '.ort': onnxruntime's ORT format; 'ours' "
                  "converts with constant folding off and 4-/2-bit indices as packed uint8 (the format has no 4-bit "
                  "type), 'converter' is onnxruntime's tool with its defaults, which folds the decode into dense weights.")]
    comp = C.Table("storage_compressed", f"The same files through gzip -{GZIP_LEVEL}"
                   + (f" and zstd -{ZSTD_LEVEL}" if zstd_ok else ""),
                   ["model", "fp32 ONNX gz", "ours ONNX gz", "fp32 gz / ours gz", "ours ONNX gz / ours ONNX",
                    "ours safetensors gz", *(["fp32 ONNX zst", "ours ONNX zst", "ours safetensors zst"] if zstd_ok else [])])
    for name, r in results.items():
        cells = [C.fmt_bytes(r["fp32 onnx"]["gzip"]), C.fmt_bytes(r["ours onnx"]["gzip"]),
                 f"{r['fp32 onnx']['gzip'] / r['ours onnx']['gzip']:.2f}x",
                 f"{r['ours onnx']['gzip'] / r['ours onnx']['bytes']:.3f}", C.fmt_bytes(r["ours safetensors"]["gzip"])]
        if zstd_ok:
            cells += [C.fmt_bytes(r[k]["zstd"]) for k in ("fp32 onnx", "ours onnx", "ours safetensors")]
        comp.add(name, *cells)
    if not zstd_ok:
        comp.notes = [("zstd not measured: the `zstandard` module is not importable in this environment "
                      "(not installed; installing packages was out of scope).")]
    return [main, comp]


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    C.quiet()
    from _artifacts import SAMPLE_NAMES, build_minilm, build_sample

    zstd = _zstd()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        tmp = Path(tmp)
        builders = [(n, lambda n=n: build_sample(n, tmp / n)) for n in SAMPLE_NAMES]
        if not args.quick:
            builders.append(("minilm", lambda: build_minilm(tmp / "minilm")))
        for name, make in builders:
            b = make()
            results[name] = measure(b, zstd)
            print(f"{name}: fp32 {results[name]['fp32 onnx']['bytes']:,} B, ours {results[name]['ours onnx']['bytes']:,} B",
                  flush=True)
    C.finish("storage", started, args, tables(results, zstd is not None),
             {"files": results, "gzip_level": GZIP_LEVEL, "zstd_level": ZSTD_LEVEL if zstd else None,
              "zstd": "measured" if zstd else "zstandard not importable"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
