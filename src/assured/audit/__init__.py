"""``assured audit``: crash the processors on purpose and count what was lost or duplicated.

workload → processors under faults → wait until everything is consumed → checker → report.
"""

from assured.audit.checker import ANOMALIES, Findings
from assured.audit.supervisor import FAULTS, AuditConfig, run_audit

__all__ = ["ANOMALIES", "FAULTS", "AuditConfig", "Findings", "run_audit"]
