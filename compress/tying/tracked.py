"""A clustered tensor being soft-tied: its live parameter, codebook rows and current clusters.

Shared by `SoftTie` (pairwise prior) and `Mixture` (Gaussian-mixture prior); under torch.distributed
it also knows which rows this rank owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..granularity import Granularity
from .cluster import nearest_labels
from .plan import TensorPlan

_CHANNEL = Granularity("channel")


@dataclass
class TiedTensor:
    """One clustered tensor: the live parameter, its rows' codebook group, and its current clusters."""

    plan: TensorPlan
    param: nn.Parameter
    row_group: torch.Tensor  # codebook row of each first-axis row [rows]
    centers: torch.Tensor  # [groups, K] current shared values (float64, no grad)
    ids: torch.Tensor  # flat cluster id (group * K + label) of every element this rank owns
    rows: slice | None = None  # the first-axis rows this rank owns (None: all, one process)
    scale: float = 1.0  # gradient multiplier of the owned rows' penalty (world size under DDP)

    @property
    def groups(self) -> int:
        return self.centers.shape[0]

    @property
    def k(self) -> int:
        return self.centers.shape[1]

    def element_group(self) -> torch.Tensor:
        """Codebook row of every element, flat [numel]."""
        rows = self.row_group.numel()
        return self.row_group[:, None].expand(rows, self.param.numel() // max(rows, 1)).reshape(-1)

    # --- the rows this rank owns (distributed) ----------------------------------------------------

    def local_rows(self) -> torch.Tensor:
        """The owned rows of the weight (with gradients): an FSDP shard or a slice of a replica."""
        if is_sharded(self.param):
            return self.param.to_local()
        return self.param[self.rows]

    def local_group(self) -> torch.Tensor:
        """Codebook row of every owned element, flat."""
        g = self.row_group[self.rows]
        per_row = self.param.numel() // max(self.row_group.numel(), 1)
        return g[:, None].expand(g.numel(), per_row).reshape(-1)

    def local_labels(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest centre of every owned element (`w`: the owned rows), as `nearest_labels` would give."""
        return nearest_labels(w, self.centers[self.row_group[self.rows]], _CHANNEL)


def cluster_sums(w: torch.Tensor, ids: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sum of weights and count (float64). A distributed version all-reduces these two."""
    counts = torch.bincount(ids, minlength=clusters).to(torch.float64)
    sums = torch.zeros(clusters, dtype=torch.float64, device=w.device).index_add(0, ids, w.to(torch.float64))
    return sums, counts



def is_sharded(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def check_shard(t: TiedTensor) -> None:
    """An FSDP2 parameter must be sharded on its first axis the way `Group.rows` expects."""
    if not is_sharded(t.param):
        return
    from torch.distributed.tensor import Shard

    placements = tuple(t.param.placements)
    owned = t.rows.stop - t.rows.start
    if placements != (Shard(0),) or t.param.to_local().shape[0] != owned:
        raise UnsupportedModelError(f"`{t.plan.name}` is sharded as {placements} with "
                                    f"{t.param.to_local().shape[0]} local rows; soft tying expects FSDP2's "
                                    f"default Shard(0) ({owned} rows on this rank)")
