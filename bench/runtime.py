"""onnxruntime on CPU: session load time, latency and resident memory, fp32 vs the toolkit's ONNX.

For MiniLM (BertModel + mean pooling, exported with dynamo) and the CNN sample: the fp32 ONNX, and
the toolkit's ONNX (`TieConfig(bits=4)`, see `_artifacts.py`) opened three ways: a plain
`onnxruntime.InferenceSession` with default options (what any user of the file gets: onnxruntime
folds the decode into dense weights at load), `compress.runtime.make_session` (the same, plus
returning the memory freed at load to the system), and `make_session(keep_compressed=True)` (the
weights stay codebook + indices; every run decodes them). Each at the benchmark batch and at batch 1.

Every measurement is a fresh Python process: it imports onnxruntime and `compress.runtime`, records
its resident memory, opens the session (timed), runs a few warm-up inferences, then times `--runs`
inferences (median). Memory is what the session added: resident after the runs and the peak
(VmHWM), each minus the process's memory before the session. `--repeat` processes per variant,
interleaved across variants so drift hits all alike; the tables give medians over processes and
every ratio compares numbers of the same run.

    python bench/runtime.py          # ~4 min on 2 cores
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
import onnx  # make_session's file check imports it lazily: keep import time and memory out of the session's
import onnxruntime
import compress.io.onnx_file
from compress.runtime import make_session
inputs = [np.load(f) for f in ARGS["inputs"]]
base_rss, _ = rss_bytes()
start = time.perf_counter()
if ARGS["plain"]:
    session = onnxruntime.InferenceSession(ARGS["path"], providers=["CPUExecutionProvider"])
else:
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

VARIANTS = {  # name -> (file attribute, plain InferenceSession, keep_compressed)
    "fp32": ("fp32_onnx", True, False),
    "ours, plain session": ("onnx", True, False),
    "ours, make_session": ("onnx", False, False),
    "ours, keep_compressed": ("onnx", False, True),
}
BATCHES = ("bench", "1")


@dataclass
class Sample:
    model: str
    batch: str
    variant: str
    load_s: float
    latency_s: float
    rss: int
    peak: int


def measure(built, inputs_files: dict[str, list[str]], repeat: int, runs: int) -> list[Sample]:
    out = []
    for _ in range(repeat):
        for batch, files in inputs_files.items():
            for variant, (attr, plain, keep) in VARIANTS.items():
                args = {"path": str(getattr(built, attr)), "plain": plain, "keep_compressed": keep, "inputs": files,
                        "warmup": 3, "runs": runs}
                d = C.run_child(CHILD, args)
                out.append(Sample(built.name, batch, variant, d["load_s"], d["latency_s"], d["rss"], d["peak"]))
    return out


def _median(samples: list[Sample], model: str, batch: str, variant: str) -> dict[str, float]:
    s = [x for x in samples if x.model == model and x.batch == batch and x.variant == variant]
    return {k: statistics.median(getattr(x, k) for x in s) for k in ("load_s", "latency_s", "rss", "peak")}


def table(samples: list[Sample], built_list, runs: int, repeat: int) -> C.Table:
    t = C.Table("runtime", "onnxruntime CPU: session load, latency and the memory the session adds, as ratios to "
                f"fp32 in the same run (medians over {repeat} fresh processes)",
                ["model", "batch", "variant", "file", "load", "latency", "vs fp32", "resident", "vs fp32", "peak",
                 "vs fp32"])
    for b in built_list:
        for batch in BATCHES:
            shape = b.inputs[0].shape[0] if batch == "bench" else 1
            fp32 = _median(samples, b.name, batch, "fp32")
            for v, (attr, _, _) in VARIANTS.items():
                m = _median(samples, b.name, batch, v)
                t.add(b.name, str(shape), v, C.fmt_bytes(Path(getattr(b, attr)).stat().st_size), C.fmt_s(m["load_s"]),
                      C.fmt_s(m["latency_s"]), f"{m['latency_s'] / fp32['latency_s']:.3f}x", C.fmt_bytes(m["rss"]),
                      f"{m['rss'] / fp32['rss']:.2f}x", C.fmt_bytes(m["peak"]), f"{m['peak'] / fp32['peak']:.2f}x")
    shapes = "; ".join(f"{b.name}: {' + '.join(str(list(x.shape)) for x in b.inputs)}" for b in built_list)
    t.notes = [(f"Latency: median of {runs} runs after 3 warm-up runs, per process. Benchmark inputs {shapes}; "
               "batch 1 is the first row of each. fp32 and 'plain session': onnxruntime.InferenceSession with "
               "default options; 'make_session' and 'keep_compressed': compress.runtime.make_session.")]
    return t


def targets(samples: list[Sample], built_list) -> list[C.Target]:
    out = []
    for b in built_list:
        fp32 = _median(samples, b.name, "bench", "fp32")
        plain = _median(samples, b.name, "bench", "ours, plain session")
        ratio = plain["latency_s"] / fp32["latency_s"]
        out.append(C.Target(f"runtime {b.name}", "default-mode latency within 5% of fp32 ONNX",
                            f"{ratio:.3f}x fp32 ({C.fmt_s(plain['latency_s'])} vs {C.fmt_s(fp32['latency_s'])})",
                            ratio <= 1.05))
        worst = max(plain["rss"] / fp32["rss"], plain["peak"] / fp32["peak"])
        out.append(C.Target(f"memory {b.name}", "plain default session: resident and peak within 5% of fp32",
                            f"resident {plain['rss'] / fp32['rss']:.2f}x, peak {plain['peak'] / fp32['peak']:.2f}x",
                            worst <= 1.05))
        keep = {batch: _median(samples, b.name, batch, "ours, keep_compressed") for batch in BATCHES}
        lat = {batch: keep[batch]["latency_s"] / _median(samples, b.name, batch, "fp32")["latency_s"]
               for batch in BATCHES}
        rss = keep["bench"]["rss"] / fp32["rss"]
        out.append(C.Target(f"compressed-resident {b.name}",
                            "keep_compressed: <= 2.5x fp32 latency at the bench batch, <= 1.5x at batch 1, "
                            "resident <= 0.35x fp32",
                            f"{lat['bench']:.2f}x, {lat['1']:.2f}x at batch 1, resident {rss:.2f}x",
                            lat["bench"] <= 2.5 and lat["1"] <= 1.5 and rss <= 0.35))
    return out


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--runs", type=int, default=30, help="timed inferences per process"))
    started = time.perf_counter()
    C.quiet()
    from _artifacts import build_minilm, build_sample

    missing = [why for mod, names in (("tying", ("analyze", "merge_")), ("export.onnx", ("export_onnx",)),
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
            files = {}
            for batch in BATCHES:
                files[batch] = []
                for i, x in enumerate(b.inputs):
                    files[batch].append(str(tmp / f"{b.name}.{batch}.input{i}.npy"))
                    np.save(files[batch][-1], (x if batch == "bench" else x[:1]).numpy())
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
