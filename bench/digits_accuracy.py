"""Accuracy against size on digits: this toolkit vs coremltools' palettizers, MLP and CNN samples.

For 8, 4, 3, 2 and 1 bits per weight, the held-out accuracy of:

- `ours ptq`: `analyze` + `merge_` (1D k-means per tensor, no training);
- `ours soft pairwise` / `ours soft mixture`: `finetune_` (soft tying, then hard merge, then the
  codebooks tuned) with the same number of epochs in total as the peer gets;
- `ours refine`: what `compress tie --data` does by default: error-compensated assignment (`assign_`)
  on the calibration split, then `refine_` (latent weights and shared values trained through the merged
  model, assignments free to move) for the same number of epochs as the peer;
- `cml ptq`: coremltools 9.0 `PostTrainingPalettizer`, per tensor;
- `cml dkm`: coremltools `DKMPalettizer`, fine-tuned with Adam on the same data, batches and epochs.

The palettizers work on `nn.Module` types (Linear / Conv2d) and `.pt2` programs lose them, so the
sample architectures are rebuilt from `samples/train.py` and loaded with the samples' weights; the
toolkit is applied to the same modules. Every Linear/Conv2d weight is clustered by every method
(biases stay fp32 everywhere). Bits per weight count the indices at ceil(log2 K) bits and every
fp32 codebook entry, measured on the final model: K is the number of distinct values per tensor.

    python bench/digits_accuracy.py            # all bits post-training, fine-tuning at 4, 3, 2, 1 bits
    python bench/digits_accuracy.py --finetune-bits 8,4,3,2,1   # fine-tuning at 8 bits too (~7 min more)
    python bench/digits_accuracy.py --quick    # 4 and 1 bits, 1 epoch
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass

import _common as C
import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4, 3, 2, 1)
PEER_EPOCHS = 10  # FACTS.md: the published DKM figures come from 10 epochs of Adam at lr 1e-4
PEER_LR = 1e-4
BATCH = 32
SEED = 0
MODELS = {"mlp": "digits_mlp.pt2", "cnn": "digits_cnn.pt2"}


@dataclass
class Row:
    model: str
    method: str
    bits: int  # the bits asked for
    bpw: float  # measured bits per clustered weight, codebooks included
    max_k: int  # most distinct values in one clustered tensor
    accuracy: float  # held-out, %
    seconds: float
    note: str = ""


# --- models and data --------------------------------------------------------------------------------

def rebuild(name: str) -> nn.Module:
    """The sample's architecture as a plain nn.Module with the sample's weights (via compress.io.load)."""
    from compress.io import load
    from samples.train import DigitsCNN, DigitsMLP

    model = {"mlp": DigitsMLP, "cnn": DigitsCNN}[name]()
    loaded = load(C.SAMPLES / MODELS[name])
    state = {k: loaded.tensors[k] for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def clustered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    return 100.0 * (model(data.test_inputs).argmax(1) == data.test_targets).double().mean().item()


def measured_bits(model: nn.Module) -> tuple[float, int]:
    """(bits per clustered weight including fp32 codebooks, largest K) from the model's actual values."""
    bits = numel = max_k = 0
    for w in clustered_weights(model).values():
        b, n = C.dense_palette_bits(w)
        bits, numel = bits + b, numel + n
        max_k = max(max_k, int(torch.unique(w.detach()).numel()))
    return bits / numel, max_k


def batches(n: int, epochs: int):
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=gen).split(BATCH)


# --- this toolkit -----------------------------------------------------------------------------------

def tie_config(model: nn.Module, bits: int):
    """Every Linear/Conv2d weight at `bits`, per tensor; a tensor with fewer elements than 2**bits gets
    the most bits it can hold (the toolkit refuses K > n), which the bits column then shows."""
    from compress.tying import TieConfig

    by_name = {n: {"bits": int(math.log2(w.numel()))} for n, w in clustered_weights(model).items()
               if w.numel() < 2 ** bits}
    return TieConfig(bits=bits, granularity="tensor", min_elements=0, tie_tensors=False, by_name=by_name)


def ours_ptq(model: nn.Module, bits: int, data, epochs: int) -> str:
    from compress.tying import analyze, merge_

    merge_(model, analyze(model, tie_config(model, bits)))
    return ""


def ours_soft(prior: str):
    def run(model: nn.Module, bits: int, data, epochs: int) -> str:
        from compress.tying import FinetuneConfig, analyze, finetune_

        # the same epochs in total as the peer: soft tying, then (after the merge) codebook tuning
        codebook_epochs = min(2, max(epochs - 1, 0))
        cfg = FinetuneConfig(epochs=epochs - codebook_epochs, codebook_epochs=codebook_epochs,
                             batch_size=BATCH, prior=prior, seed=SEED, progress=False)
        finetune_(model, analyze(model, tie_config(model, bits)), data, cfg)
        return f"{cfg.epochs}+{cfg.codebook_epochs} epochs, lr {cfg.lr:g}"
    return run


# --- coremltools ------------------------------------------------------------------------------------

def cml_ptq(model: nn.Module, bits: int, data, epochs: int) -> str:
    pal = C.import_coremltools()
    cfg = pal.PostTrainingPalettizerConfig.from_dict(
        {"global_config": {"n_bits": bits, "granularity": "per_tensor"}})
    with C.silenced():
        out = pal.PostTrainingPalettizer(model, cfg).compress(inplace=True)
    if out is not model:
        raise RuntimeError("PostTrainingPalettizer.compress(inplace=True) returned a new model")
    return ""


def cml_dkm(model: nn.Module, bits: int, data, epochs: int) -> str:
    pal = C.import_coremltools()
    # DKM refuses more clusters than weights: a small tensor gets the most bits it can hold, as ours does
    small = {n.removesuffix(".weight"): pal.ModuleDKMPalettizerConfig(n_bits=int(math.log2(w.numel())), weight_threshold=0)
             for n, w in clustered_weights(model).items() if w.numel() < 2 ** bits}
    cfg = pal.DKMPalettizerConfig(global_config=pal.ModuleDKMPalettizerConfig(n_bits=bits, weight_threshold=0),
                                  module_name_configs=small)
    palettizer = pal.DKMPalettizer(model, cfg)
    with C.silenced():
        prepared = palettizer.prepare(inplace=True)
        opt = torch.optim.Adam(prepared.parameters(), lr=PEER_LR)
        prepared.train()
        x, y = data.calib_inputs, data.calib_targets
        for idx in batches(len(x), epochs):
            opt.zero_grad()
            F.cross_entropy(prepared(x[idx]), y[idx]).backward()
            opt.step()
            palettizer.step()
        palettizer.finalize(inplace=True)
    return f"{epochs} epochs, lr {PEER_LR:g}"


def ours_refine(model: nn.Module, bits: int, data, epochs: int) -> str:
    from dataclasses import replace

    from compress.tying import RefineConfig, analyze, assign_, batches_of, refine_

    cfg = replace(tie_config(model, bits), method="compensated")
    result = assign_(model, analyze(model, cfg), cfg, batches_of(data.calib_inputs[:1024]))
    rc = RefineConfig(epochs=epochs, batch_size=BATCH, seed=SEED)
    refine_(model, result.codebooks, data, rc)
    return f"compensated + {epochs} epochs, lr {rc.lr:g} / {rc.codebook_lr:g} of the gap between shared values"


METHODS = {
    "ours ptq": ("compress.tying.plan", ours_ptq),
    "ours soft pairwise": ("compress.tying.finetune", ours_soft("pairwise")),
    "ours soft mixture": ("compress.tying.finetune", ours_soft("mixture")),
    "ours refine": ("compress.tying.refine", ours_refine),
    "cml ptq": (None, cml_ptq),
    "cml dkm": (None, cml_dkm),
}
FINETUNED = ("ours soft pairwise", "ours soft mixture", "ours refine", "cml dkm")


def run_one(name: str, base: nn.Module, method: str, bits: int, data, epochs: int) -> Row:
    """One method at one bit width; a method that raises is recorded (accuracy NaN, the error as note)."""
    model = copy.deepcopy(base)
    torch.manual_seed(SEED)
    error = None
    with C.stopwatch() as t:
        try:
            note = METHODS[method][1](model, bits, data, epochs)
        except Exception as e:  # noqa: BLE001 -- a failure is a result to report, not a reason to stop
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if error is not None:
        return Row(name, method, bits, math.nan, 0, math.nan, t[0], f"FAILED: {error}")
    bpw, max_k = measured_bits(model)
    return Row(name, method, bits, bpw, max_k, accuracy(model, data), t[0], note)


# --- output -----------------------------------------------------------------------------------------

def tables(rows: list[Row], fp32: dict[str, float], methods: list[str], bits: tuple[int, ...]) -> list[C.Table]:
    out = []
    for name in MODELS:
        t = C.Table(f"digits_{name}", f"digits {name.upper()}: held-out accuracy % (bits per weight incl. "
                    f"codebooks) — fp32 {fp32[name]:.2f}%", ["method", *[f"{b} bit" for b in bits]])
        for m in methods:
            cells = []
            for b in bits:
                r = next((r for r in rows if r.model == name and r.method == m and r.bits == b), None)
                cells.append("—" if r is None else "failed" if math.isnan(r.accuracy)
                             else f"{r.accuracy:.2f} ({r.bpw:.2f})")
            t.add(m, *cells)
        notes = sorted({f"{r.method}: {r.note}" for r in rows if r.model == name and r.note
                        and not r.note.startswith("FAILED")})
        notes += [f"{r.method} at {r.bits} bit {r.note}" for r in rows if r.model == name and r.note.startswith("FAILED")]
        t.notes = [("; ".join(notes)) + f"; batch {BATCH}, seed {SEED}."] if notes else []
        out.append(t)
    timing = C.Table("digits_time", "digits: wall time per run (s), median over bits",
                     ["method", *[n.upper() for n in MODELS]])
    for m in methods:
        cells = []
        for name in MODELS:
            secs = [r.seconds for r in rows if r.model == name and r.method == m]
            cells.append("—" if not secs else f"{statistics.median(secs):.1f}")
        timing.add(m, *cells)
    return out + [timing]


def plot(rows: list[Row], fp32: dict[str, float], methods: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.5), sharey=True)
    for ax, name in zip(axes, MODELS):
        for m in methods:
            pts = sorted((r.bpw, r.accuracy) for r in rows if r.model == name and r.method == m
                         and not math.isnan(r.accuracy))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m.startswith("cml") else "-")
        ax.axhline(fp32[name], color="grey", linewidth=0.8, label="fp32")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight (codebooks included)")
        ax.set_title(f"digits {name.upper()}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].set_ylim(bottom=max(0, min(r.accuracy for r in rows if not math.isnan(r.accuracy)) - 2))
    axes[-1].legend(loc="lower right", fontsize=8)
    return C.save_plot(fig, "digits_accuracy")


def targets(rows: list[Row], fp32: dict[str, float]) -> list[C.Target]:
    best = [r for r in rows if r.model == "mlp" and r.bits == 1 and r.method in FINETUNED
            and r.method.startswith("ours") and not math.isnan(r.accuracy)]
    dkm = next((r for r in rows if r.model == "mlp" and r.bits == 1 and r.method == "cml dkm"), None)
    goal = "digits MLP at 1 bit within 0.5 pt of fp32, same fine-tuning epochs as the peer"
    if not best:
        return [C.Target("digits MLP 1 bit", goal, "not run", None, "fine-tuning did not run")]
    r = max(best, key=lambda r: r.accuracy)
    gap = fp32["mlp"] - r.accuracy
    peer = f"; cml dkm {dkm.accuracy:.2f}%" if dkm else ""
    where = f"({gap:.2f} pt below){peer}" if gap >= 0 else f"({-gap:.2f} pt above){peer}"
    out = [C.Target("digits MLP 1 bit", goal, f"{r.method}: {r.accuracy:.2f}% vs fp32 {fp32['mlp']:.2f}% {where}",
                    gap <= 0.5)]
    if dkm is not None and not math.isnan(dkm.accuracy):
        out.append(C.Target("digits MLP 1 bit vs DKM", "digits MLP at 1 bit >= coremltools DKM, the peer's 10 epochs",
                            f"{r.method}: {r.accuracy:.2f}% vs cml dkm {dkm.accuracy:.2f}%", r.accuracy >= dkm.accuracy))
    return out


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--finetune-bits", default="4,3,2,1",
        help="bits at which the fine-tuning methods run (comma list). 8 is left out by default to keep the "
             "whole bench under 20 min on 2 cores: at 8 bits DKM and the mixture prior take ~3 min each on the "
             "MLP (K=256), and post-training is already within noise of fp32"))
    started = time.perf_counter()
    C.quiet()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from compress.io import load_data

    data = load_data(C.SAMPLES / "digits_data.pt")
    bits = (4, 1) if args.quick else BITS
    epochs = 1 if args.quick else PEER_EPOCHS
    ft_bits = {int(b) for b in args.finetune_bits.split(",") if b.strip()}
    missing, methods = [], []
    for m, (module, _) in METHODS.items():
        if module:
            mod, why = C.toolkit(module.removeprefix("compress."))
            if mod is None:
                missing.append(f"{m}: {why}")
                continue
        methods.append(m)
    rows, fp32 = [], {}
    for name in MODELS:
        base = rebuild(name)
        fp32[name] = accuracy(base, data)
        for m in methods:
            for b in bits:
                if m in FINETUNED and b not in ft_bits:
                    continue
                r = run_one(name, base, m, b, data, epochs)
                print(f"{name} {m:20s} {b} bit: {r.accuracy:6.2f}%  {r.bpw:.3f} bpw  K<={r.max_k}  {r.seconds:.1f} s",
                      flush=True)
                rows.append(r)
    png = plot(rows, fp32, methods)
    C.finish("digits_accuracy", started, args, tables(rows, fp32, methods, bits),
             {"fp32": fp32, "rows": [asdict(r) for r in rows], "epochs": epochs, "finetune_bits": sorted(ft_bits)},
             targets=targets(rows, fp32), missing=missing, plots=[png])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
