"""Tying: decide and cluster (`analyze`), soft-tie while fine-tuning (`SoftTie`, `finetune_`), merge.

    plan = analyze(model, TieConfig(bits=4))          # cluster.decide + cluster.cluster_tensor per tensor
    st = SoftTie(model, plan)                         # optional: in your own training loop
    codebooks = merge_(model, plan)                   # or st.finalize()
"""

from .cluster import Clustering, Decision, check_finite, cluster_tensor, decide, nearest_labels
from .config import MAX_BITS, MAX_K, Settings, TieConfig
from .finetune import FinetuneConfig, FinetuneResult, finetune_, refresh_codebooks
from .importance import estimate_importance
from .merge import current_weight, live_parameter, merge_
from .plan import PlannedTie, TensorPlan, TiePlan, analyze
from .soft_tie import PRIORS, SoftTie

__all__ = [
    "MAX_BITS",
    "MAX_K",
    "PRIORS",
    "Clustering",
    "Decision",
    "FinetuneConfig",
    "FinetuneResult",
    "PlannedTie",
    "Settings",
    "SoftTie",
    "TensorPlan",
    "TieConfig",
    "TiePlan",
    "analyze",
    "check_finite",
    "cluster_tensor",
    "current_weight",
    "decide",
    "estimate_importance",
    "finetune_",
    "live_parameter",
    "merge_",
    "nearest_labels",
    "refresh_codebooks",
]
