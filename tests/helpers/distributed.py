"""Worker processes and helpers for tests/test_distributed.py.

Run as one rank of a gloo process group (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun
sets them): `python -m tests.helpers.distributed MODE OUT_DIR`.

* `match`: fine-tunes the small models of `SCENARIOS` and saves, per scenario and rank, the merged
  state, the codebooks, the plan's digest and the soft-tie state after every step.
* `raise`: rank 1's model raises in its third training forward pass.
* `crash`: rank 1 dies (`os._exit(3)`) in its third training forward pass, without unwinding.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from compress.tying import FinetuneConfig, TieConfig, analyze, finetune_
from compress.tying import finetune as finetune_module
from compress.tying.soft_tie import SoftTie
from tests.helpers.models import TwoLayer, trained_two_layer

# fc1 [32, 48] one codebook; fc2 [4, 32] one codebook per row (rank 0 owns rows 0-1, rank 1 rows 2-3).
TIE = TieConfig(bits=2, min_elements=100, by_name={"fc2.weight": {"granularity": "channel"}})
# 96 samples in batches of 19: shards of 10 and 9 rows, and a last batch of one sample (rank 1 gets none).
_RUN = {"epochs": 2, "codebook_epochs": 1, "batch_size": 19, "update_every": 2, "warmup": 0.5,
        "progress": False, "seed": 5}
SCENARIOS = {
    "ddp-pairwise": FinetuneConfig(**_RUN),
    "ddp-mixture": FinetuneConfig(**_RUN, prior="mixture", strength=1e-2, zero_component=True),
    "fsdp-pairwise": FinetuneConfig(**_RUN, fsdp=True),
    "fsdp-mixture": FinetuneConfig(**_RUN, prior="mixture", strength=1e-2, fsdp=True),
}


class RecordingSoftTie(SoftTie):
    """SoftTie that keeps its state (centres, or the mixture's parameters) after every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record: list[torch.Tensor] = []
        RecordingSoftTie.last = self

    def step(self) -> None:
        super().step()
        if self._mixture is not None:
            self.record.append(torch.cat([p.detach().reshape(-1).double() for p in self.parameters()]))
        else:
            self.record.append(torch.cat([t.centers.reshape(-1) for t in self._tensors]))


def run_scenario(cfg: FinetuneConfig) -> dict:
    """Fine-tune a barely trained `TwoLayer` (float64: the comparison sees the algorithm, not float32
    summation order; the task loss still matters) in this process; the results to compare."""
    model, data = trained_two_layer(steps=3)
    model = model.double()
    for name in ("calib_inputs", "test_inputs"):
        setattr(data, name, getattr(data, name).double())
    plan = analyze(model, TIE)
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()
    original, finetune_module.SoftTie = finetune_module.SoftTie, RecordingSoftTie
    try:
        result = finetune_(model, plan, data, cfg)
    finally:
        finetune_module.SoftTie = original
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "codebooks": {n: (cb.codebook.clone(), cb.indices.clone()) for n, cb in result.codebooks.tensors.items()},
            "steps": torch.stack(RecordingSoftTie.last.record), "plan": digest,
            "history": result.history, "left": _wrappers_alive()}


def _wrappers_alive() -> list[str]:
    """DDP / FSDP objects still alive (no gc here): left for interpreter shutdown, their gloo work
    made the process abort on exit."""
    import gc

    kinds = ("DistributedDataParallel", "FSDPState", "FSDPParamGroup", "FSDPCommContext")
    return sorted({type(o).__name__ for o in gc.get_objects() if type(o).__name__ in kinds})


class Flaky(TwoLayer):
    """Rank 1 fails in its third training forward pass: `raise` raises, `crash` dies on the spot."""

    how = "raise"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            self.calls += 1
            if self.calls == 3:
                if self.how == "crash":
                    os._exit(3)
                raise ValueError("rank 1 cannot go on")
        return super().forward(x)


def run_failing(how: str) -> None:
    trained, data = trained_two_layer()
    model = Flaky()
    model.load_state_dict(trained.state_dict())
    Flaky.how = how
    finetune_(model, analyze(model, TieConfig(bits=2)), data, FinetuneConfig(**_RUN))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "match":
        for name, cfg in SCENARIOS.items():
            torch.save(run_scenario(cfg), out / f"{name}.rank{rank}.pt")
        dist.destroy_process_group()
        return
    try:
        run_failing(mode)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        (out / f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}")
    # the traceback is gone here: free the DDP reducer and its pending gloo work before the group
    # (held past destroy_process_group, gloo aborted the process on exit now and then)
    gc.collect()
    dist.destroy_process_group()
    sys.exit(1)


if __name__ == "__main__":
    main()
