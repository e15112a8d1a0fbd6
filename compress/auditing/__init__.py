"""The audit: where a model's bytes are and how much parameter sharing could save (`audit`).

    report = audit(compress.io.load("model.pt2"), AuditConfig(tolerance=1e-3))
    rich.print(report.to_table(top=20))
"""

from .measure import audit
from .report import AuditConfig, AuditReport, TensorAudit, TensorTie
from .ties import find_tensor_ties

__all__ = ["AuditConfig", "AuditReport", "TensorAudit", "TensorTie", "audit", "find_tensor_ties"]
