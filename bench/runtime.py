"""onnxruntime on CPU: session load time, latency and resident memory, fp32 vs the toolkit's ONNX.

For MiniLM (BertModel + mean pooling, exported with dynamo) and the CNN sample: the fp32 ONNX, the
toolkit's ONNX (`TieConfig(bits=4)`, see `_artifacts.py`) in the default mode (onnxruntime folds the
codebook decode into dense weights at load) and in keep-compressed mode (constant folding off:
only codebooks and indices stay resident, each run decodes), the latter also with
`MALLOC_MMAP_THRESHOLD_=131072` (compress/runtime.py: glibc otherwise keeps decoded buffers).

Every measurement is a fresh Python process: it imports onnxruntime and `compress.runtime` (and what
`make_session` imports lazily, so load time is the session's, not imports'), records
its resident memory, opens the session with `compress.runtime.make_session` (timed), runs a few
warm-up inferences, then times `--runs` inferences (median). Memory is what the session added:
resident after the runs and the peak (VmHWM), each minus the process's memory before the session.
`--repeat` processes per variant, interleaved across variants so drift hits all alike; the
tables give medians over processes.

    python bench/runtime.py          # ~3 min on 2 cores
    python bench/runtime.py --quick
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _common as C
import numpy as np

CHILD = r"""
import statistics, time
import numpy as np
import onnxruntime
import compress.io.onnx_file  # make_session imports it lazily: keep import time out of the load time
from compress.runtime import make_session
inputs = [np.load(f) for f in ARGS["inputs"]]
base_rss, _ = rss_bytes()
start = time.perf_counter()
session = make_session(ARGS["path"], "cpu", ARGS["keep_compressed"])
load_s = time.perf_counter() - start
feed = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
for _ in range(ARGS["warmup"]):
    session.run(None, feed)
times = []
for _ in range(ARGS["runs"]):
    t = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - t)
rss, peak = rss_bytes()
print(json.dumps({"load_s": load_s, "latency_s": statistics.median(times), "rss": rss - base_rss,
                  "peak": peak - base_rss, "base_rss": base_rss}))
"""

VARIANTS = {  # name -> (file attribute, keep_compressed, extra environment)
    "fp32": ("fp32_onnx", False, {}),
    "ours default": ("onnx", False, {}),
    "ours keep_compressed": ("onnx", True, {}),
    "ours keep_compressed + mmap threshold": ("onnx", True, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
}


@dataclass
class Sample:
    model: str
    variant: str
    load_s: float
    latency_s: float
    rss: int
    peak: int


def measure(built, inputs_files: list[str], repeat: int, runs: int) -> list[Sample]:
    out = []
    for _ in range(repeat):
        for variant, (attr, keep, env) in VARIANTS.items():
            args = {"path": str(getattr(built, attr)), "keep_compressed": keep, "inputs": inputs_files,
                    "warmup": 3, "runs": runs}
            d = C.run_child(CHILD, args, env=env)
            out.append(Sample(built.name, variant, d["load_s"], d["latency_s"], d["rss"], d["peak"]))
    return out


def table(samples: list[Sample], built_list, runs: int, repeat: int) -> C.Table:
    t = C.Table("runtime", "onnxruntime CPU: session load, latency, memory the session adds (medians over "
                f"{repeat} fresh processes)", ["model", "variant", "file", "load", "latency", "vs fp32",
                                               "resident", "peak"])
    for b in built_list:
        med = {}
        for v in VARIANTS:
            s = [x for x in samples if x.model == b.name and x.variant == v]
            med[v] = {k: statistics.median(getattr(x, k) for x in s) for k in ("load_s", "latency_s", "rss", "peak")}
        for v, (attr, _, _) in VARIANTS.items():
            m = med[v]
            ratio = m["latency_s"] / med["fp32"]["latency_s"]
            t.add(b.name, v, C.fmt_bytes(Path(getattr(b, attr)).stat().st_size), C.fmt_s(m["load_s"]),
                  C.fmt_s(m["latency_s"]), f"{ratio:.3f}x", C.fmt_bytes(m["rss"]), C.fmt_bytes(m["peak"]))
    shapes = "; ".join(f"{b.name}: {' + '.join(str(list(x.shape)) for x in b.inputs)}" for b in built_list)
    t.notes = [(f"Latency: median of {runs} runs after 3 warm-up runs, per process. Inputs {shapes}. Sessions via "
               "compress.runtime.make_session (fp32: onnxruntime defaults). 'vs fp32': latency ratio in this run.")]
    return t


def targets(samples: list[Sample], built_list) -> list[C.Target]:
    out = []
    for b in built_list:
        lat = {v: statistics.median(x.latency_s for x in samples if x.model == b.name and x.variant == v)
               for v in ("fp32", "ours default")}
        ratio = lat["ours default"] / lat["fp32"]
        out.append(C.Target(f"runtime {b.name}", "default-mode latency within 5% of fp32 ONNX",
                            f"{ratio:.3f}x fp32 ({C.fmt_s(lat['ours default'])} vs {C.fmt_s(lat['fp32'])})",
                            ratio <= 1.05))
    return out


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--runs", type=int, default=30, help="timed inferences per process"))
    started = time.perf_counter()
    C.quiet()
    from _artifacts import build_minilm, build_sample

    missing = [why for mod, names in (("plan", ("analyze",)), ("merge", ("merge_",)), ("export.onnx", ("export_onnx",)),
                                      ("export.safetensors", ("export_safetensors",)), ("runtime", ("make_session",)))
               for _, why in [C.toolkit(mod, *names)] if why]
    if missing:
        C.finish("runtime", started, args, [], {}, missing=missing)
        return 1
    repeat, runs = (2, 5) if args.quick else (args.repeat, args.runs)
    samples, built_list = [], []
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        tmp = Path(tmp)
        builders = [lambda: build_sample("digits_cnn", tmp / "cnn")]
        builders.append(lambda: build_minilm(tmp / "minilm"))
        for make in builders:
            with C.stopwatch() as t:
                b = make()
            print(f"built {b.name} in {t[0]:.0f} s", flush=True)
            files = []
            for i, x in enumerate(b.inputs):
                files.append(str(tmp / f"{b.name}.input{i}.npy"))
                np.save(files[-1], x.numpy())
            samples += measure(b, files, repeat, runs)
            built_list.append(b)
        tables = [table(samples, built_list, runs, repeat)]
        results = {"samples": [asdict(s) for s in samples], "runs": runs, "repeat": repeat,
                   "files": {b.name: {v: Path(getattr(b, a)).stat().st_size for v, (a, _, _) in VARIANTS.items()}
                             for b in built_list}}
        C.finish("runtime", started, args, tables, results, targets=targets(samples, built_list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
