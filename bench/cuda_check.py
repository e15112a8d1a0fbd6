"""onnxruntime's CUDA provider on the toolkit's ONNX: both memory modes against torch on the GPU.

For a machine with a CUDA GPU, `onnxruntime-gpu` and a CUDA build of torch (the project's `device`
tool lends one to some tasks): ties the digits MLP and CNN samples to 4 bits, exports ONNX, then for
each model and each session mode (default: decode folded at load; keep_compressed: decoded at every
run) runs `compress.verify.verify(..., provider="cuda")` and, independently, the merged model in torch
on the GPU, and reports the largest difference against the stated tolerance, the latency and the GPU
memory onnxruntime holds. Writes `bench/out/cuda_check.json` (or `$OUT/cuda_check.json`) and exits 1
when a check fails, 2 when there is no CUDA provider.

    python bench/cuda_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ATOL = RTOL = 1e-4


def main() -> int:
    import numpy as np
    import onnxruntime as ort
    import torch

    from compress.io import load, load_data
    from compress.pipeline import ExportOptions, tie
    from compress.runtime import make_session
    from compress.tying import TieConfig
    from compress.verify import verify

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        print(f"no CUDA: onnxruntime providers {ort.get_available_providers()}, torch.cuda "
              f"{torch.cuda.is_available()}")
        return 2
    data = load_data(ROOT / "samples" / "digits_data.pt")
    x = data.test_inputs[:256]
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits_mlp", "digits_cnn"):
            result = tie(load(ROOT / "samples" / f"{name}.pt2"), TieConfig(bits=4), out_dir=Path(tmp) / name,
                         export=ExportOptions(safetensors=False, verify=False))
            onnx_path = Path(tmp) / name / f"{name}.onnx"
            with torch.no_grad():
                want = result.model.to("cuda")(x.to("cuda")).float().cpu().numpy()
            result.model.to("cpu")
            for keep in (False, True):
                check = verify(onnx_path, result.model, x, provider="cuda", atol=ATOL, rtol=RTOL,
                               keep_compressed=keep, measure_runtime=False)
                session = make_session(onnx_path, "cuda", keep_compressed=keep)
                feed = {session.get_inputs()[0].name: x.numpy()}
                got = session.run(None, feed)[0]
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - t)
                diff = float(np.abs(got - want).max())
                ok = check.passed and diff <= ATOL + RTOL * float(np.abs(want).max())
                failed |= not ok
                rows.append({"model": name, "mode": "keep_compressed" if keep else "default",
                             "provider": session.get_providers()[0], "verify_passed": check.passed,
                             "max_diff_vs_torch_cuda": diff, "ok": ok,
                             "median_ms": 1000 * float(np.median(times)), "gpu": torch.cuda.get_device_name()})
                print(json.dumps(rows[-1]))
    out = Path(os.environ.get("OUT", ROOT / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
