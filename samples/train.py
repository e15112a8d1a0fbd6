"""Train the bundled sample models on scikit-learn's digits and save them as `.pt2` programs.

Four small real models, trained deterministically (seeded, one thread, deterministic algorithms)
on `sklearn.datasets.load_digits()` (1,797 8x8 images, bundled, no download). Every model takes
float32 input `[batch, 64]` (pixels / 16, in [0, 1]) and reshapes inside `forward` as it needs, so
one data file serves all four.

    python samples/train.py          # rewrites samples/*.pt2, samples/digits_data.pt, README table

The functions are importable too, e.g. `train_mlp(seed=0) -> (model, accuracy)`.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.atomic import write_bytes_atomic, write_text_atomic

SAMPLES = Path(__file__).resolve().parent
DATA_FILE = SAMPLES / "digits_data.pt"
README = SAMPLES / "README.md"
TEST_SIZE = 540
SPLIT_SEED = 0
BATCH = torch.export.Dim("batch", min=1)
ONNX_TOLERANCE = 1e-4


# --- models ---------------------------------------------------------------------------------------

class DigitsMLP(nn.Module):
    """64-300-100-10 MLP with ReLU (the LeNet-300-100 shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (1->16->32, padding 1, ReLU), 2x2 max-pool, linear 512->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


class DigitsAutoencoder(nn.Module):
    """Tied autoencoder 64->32->64: the decoder reads the encoder's one weight matrix transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, 32)
        self.decoder_bias = nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.encoder(x))
        return torch.sigmoid(F.linear(h, self.encoder.weight.t(), self.decoder_bias))


class DigitsGRU(nn.Module):
    """A GRU cell reading the image row by row (8 steps of 8 pixels), hidden 64, then linear to 10.

    The loop over rows unrolls at export; every step uses the cell's one set of weights. A cell
    (rather than `nn.GRU`) keeps each parameter a named initializer in the ONNX export: the dynamo
    exporter turns `nn.GRU` into an ONNX `GRU` node whose input weights become anonymous constants.
    """

    hidden = 64

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(8, self.hidden)
        self.fc = nn.Linear(self.hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 8, 8)
        h = x.new_zeros(rows.shape[0], self.hidden)
        for t in range(8):
            h = self.cell(rows[:, t], h)
        return self.fc(h)


# --- data -----------------------------------------------------------------------------------------

def split_indices(seed: int = SPLIT_SEED, n: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into `load_digits()` of the calibration (training) and test splits: a seeded permutation.

    >>> calib, test = split_indices()
    >>> len(calib), len(test)
    (1257, 540)
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[TEST_SIZE:].sort().values, perm[:TEST_SIZE].sort().values


def load_digits_splits(seed: int = SPLIT_SEED) -> dict[str, torch.Tensor | int]:
    """The digits data as saved in `digits_data.pt`: inputs float32 `[n, 64]` in [0, 1], targets int64.

    >>> data = load_digits_splits()
    >>> data["calib_inputs"].shape, data["test_targets"].dtype
    (torch.Size([1257, 64]), torch.int64)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the samples need scikit-learn: pip install 'compress[dev]'") from e
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.int64)
    calib, test = split_indices(seed, len(targets))
    return {"version": 1, "calib_inputs": inputs[calib], "calib_targets": targets[calib],
            "test_inputs": inputs[test], "test_targets": targets[test]}


# --- training -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Adam on seeded mini-batches."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 64


CONFIGS = {
    "digits_mlp": TrainConfig(epochs=40),
    "digits_cnn": TrainConfig(epochs=40, lr=3e-3),
    "digits_autoencoder": TrainConfig(epochs=200, lr=1e-2),
    "digits_gru": TrainConfig(epochs=60, lr=1e-2),
}


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    # One thread and deterministic kernels make a run repeatable; restore the caller's settings after.
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fit(model: nn.Module, inputs: torch.Tensor, loss_of: LossFn, cfg: TrainConfig, seed: int) -> nn.Module:
    """Train `model` with Adam; `loss_of(batch_indices, outputs)` gives the loss of one mini-batch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(inputs), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss_of(idx, model(inputs[idx])).backward()
            opt.step()
    return model.eval()


def _train_classifier(make: Callable[[], nn.Module], name: str, seed: int,
                      data: dict | None) -> tuple[nn.Module, float]:
    data = load_digits_splits() if data is None else data
    x, y = data["calib_inputs"], data["calib_targets"]
    with _deterministic():
        torch.manual_seed(seed)
        model = _fit(make(), x, lambda idx, out: F.cross_entropy(out, y[idx]), CONFIGS[name], seed)
    return model, accuracy(model, data["test_inputs"], data["test_targets"])


def train_mlp(seed: int = 0, data: dict | None = None) -> tuple[DigitsMLP, float]:
    """Train `DigitsMLP` on the calibration split; returns the model and its held-out accuracy in %.

    >>> model, acc = train_mlp(seed=0)
    """
    return _train_classifier(DigitsMLP, "digits_mlp", seed, data)


def train_cnn(seed: int = 0, data: dict | None = None) -> tuple[DigitsCNN, float]:
    """Train `DigitsCNN`; returns the model and its held-out accuracy in %."""
    return _train_classifier(DigitsCNN, "digits_cnn", seed, data)


def train_gru(seed: int = 0, data: dict | None = None) -> tuple[DigitsGRU, float]:
    """Train `DigitsGRU`; returns the model and its held-out accuracy in %."""
    return _train_classifier(DigitsGRU, "digits_gru", seed, data)


def train_autoencoder(seed: int = 0, data: dict | None = None) -> tuple[DigitsAutoencoder, float]:
    """Train `DigitsAutoencoder` (MSE loss); returns the model and its held-out reconstruction MSE."""
    data = load_digits_splits() if data is None else data
    x = data["calib_inputs"]
    with _deterministic():
        torch.manual_seed(seed)
        model = _fit(DigitsAutoencoder(), x, lambda idx, out: F.mse_loss(out, x[idx]),
                     CONFIGS["digits_autoencoder"], seed)
    return model, reconstruction_mse(model, data["test_inputs"])


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
             targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent. Works on an `nn.Module` or a loaded program's `.module()`."""
    return 100.0 * (model(inputs).argmax(1) == targets).double().mean().item()


@torch.no_grad()
def reconstruction_mse(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> float:
    """Mean squared error between `inputs` and the model's reconstruction of them."""
    return F.mse_loss(model(inputs), inputs).item()


# --- saving ---------------------------------------------------------------------------------------

def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export` the model with a dynamic batch dimension; the example is saved with it."""
    return torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: BATCH}})


def save_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Save a program as `.pt2` atomically, overwriting an older sample.

    Drops each graph node's recorded stack trace first: it holds this machine's absolute paths.
    """
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return write_bytes_atomic(path, buf.getvalue(), force=True)


def save_data(data: dict, path: Path = DATA_FILE) -> Path:
    """Save the splits with `torch.save` (a plain dict of tensors, loadable with `weights_only=True`)."""
    buf = io.BytesIO()
    torch.save(data, buf)
    return write_bytes_atomic(path, buf.getvalue(), force=True)


def onnx_max_error(program: torch.export.ExportedProgram, batches: tuple[int, ...] = (1, 7)) -> float:
    """Export the program with the dynamo ONNX exporter and return the largest |onnxruntime - torch|
    over random inputs of each batch size."""
    import onnxruntime as ort

    onnx_program = torch.onnx.export(program, program.example_inputs[0], dynamo=True,
                                     dynamic_shapes={"x": {0: BATCH}}, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    name = session.get_inputs()[0].name
    gen, worst = torch.Generator().manual_seed(1), 0.0
    for b in batches:
        x = torch.rand(b, 64, generator=gen)
        ours = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        worst = max(worst, (ours - program.module()(x)).abs().max().item())
    return worst


# --- the script -----------------------------------------------------------------------------------

TRAINERS = {"digits_mlp": train_mlp, "digits_cnn": train_cnn,
            "digits_autoencoder": train_autoencoder, "digits_gru": train_gru}


@dataclass(frozen=True)
class SampleResult:
    """One trained sample as reported in the README table."""

    name: str
    params: int
    metric: float
    seconds: float
    size_bytes: int
    onnx_error: float

    def row(self) -> str:
        metric = f"MSE {self.metric:.5f}" if self.name == "digits_autoencoder" else f"{self.metric:.2f}%"
        return (f"| `{self.name}.pt2` | {self.params:,} | {metric} | {self.size_bytes / 1024:.0f} KiB "
                f"| {self.onnx_error:.1e} |")


def build_sample(name: str, data: dict) -> SampleResult:
    """Train one sample, save it as `samples/<name>.pt2`, check the saved file, and report."""
    start = time.perf_counter()
    model, metric = TRAINERS[name](seed=0, data=data)
    seconds = time.perf_counter() - start
    path = save_program(export_program(model, data["calib_inputs"][:4].clone()), SAMPLES / f"{name}.pt2")
    program = torch.export.load(path)
    _check_batches(program, model, data["test_inputs"], path)
    onnx_error = onnx_max_error(program)
    if onnx_error > ONNX_TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {onnx_error:.1e} > {ONNX_TOLERANCE}")
    params = sum(p.numel() for p in model.parameters())
    return SampleResult(name, params, metric, seconds, path.stat().st_size, onnx_error)


def _check_batches(program: torch.export.ExportedProgram, model: nn.Module, inputs: torch.Tensor,
                   path: Path) -> None:
    for b in (1, 7):
        with torch.no_grad():
            if not torch.allclose(program.module()(inputs[:b]), model(inputs[:b]), atol=1e-6):
                raise RuntimeError(f"{path}: the saved program disagrees with the trained model at batch {b}")


_TABLE = re.compile(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)", re.DOTALL)
_HEADER = ("| file | parameters | held-out accuracy / MSE | size | ONNX max error |\n"
           "|---|---:|---:|---:|---:|\n")


def update_readme(results: list[SampleResult], readme: Path = README) -> None:
    """Rewrite the results table between the README's `results` markers."""
    text = readme.read_text()
    table = _HEADER + "".join(r.row() + "\n" for r in results)
    new, n = _TABLE.subn(lambda m: m.group(1) + table + m.group(2), text)
    if n != 1:
        raise RuntimeError(f"{readme}: no '<!-- results:begin -->' ... '<!-- results:end -->' block")
    write_text_atomic(readme, new, force=True)


def main() -> int:
    data = load_digits_splits()
    save_data(data)
    results = [build_sample(name, data) for name in TRAINERS]
    print(_HEADER + "\n".join(r.row() for r in results))
    print("training time: " + ", ".join(f"{r.name} {r.seconds:.1f} s" for r in results)
          + f"; total {sum(r.seconds for r in results):.1f} s")
    update_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
