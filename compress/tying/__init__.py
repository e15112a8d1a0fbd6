"""Tying: decide and cluster (`analyze`), soft-tie while fine-tuning (`SoftTie`, `finetune_`), merge.

    plan = analyze(model, TieConfig(bits=4))          # cluster.decide + cluster.cluster_tensor per tensor
    st = SoftTie(model, plan)                         # optional: in your own training loop
    codebooks = merge_(model, plan)                   # or st.finalize()
    result = assign_(model, plan, cfg, batches)       # or: error-compensated, vector codebooks, outliers, budget
"""

from .assign import AssignResult, assign_
from .budget import Allocation
from .cluster import Clustering, Decision, check_finite, cluster_tensor, decide, nearest_labels
from .config import DIMS, MAX_BITS, MAX_K, METHODS, Settings, TieConfig
from .finetune import FinetuneConfig, FinetuneResult, finetune_, refresh_codebooks
from .importance import estimate_importance
from .merge import current_weight, live_parameter, merge_
from .observe import batches_of
from .plan import PlannedTie, TensorPlan, TiePlan, analyze
from .refine import RefineConfig, RefineResult, refine_
from .soft_tie import PRIORS, SoftTie

__all__ = [
    "DIMS",
    "MAX_BITS",
    "MAX_K",
    "METHODS",
    "PRIORS",
    "Allocation",
    "AssignResult",
    "Clustering",
    "Decision",
    "FinetuneConfig",
    "FinetuneResult",
    "PlannedTie",
    "RefineConfig",
    "RefineResult",
    "Settings",
    "SoftTie",
    "TensorPlan",
    "TieConfig",
    "TiePlan",
    "analyze",
    "assign_",
    "batches_of",
    "check_finite",
    "cluster_tensor",
    "current_weight",
    "decide",
    "estimate_importance",
    "finetune_",
    "live_parameter",
    "merge_",
    "nearest_labels",
    "refine_",
    "refresh_codebooks",
]
