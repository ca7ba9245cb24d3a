"""safefreeze: Selective Adapter Freezing (SAFE) for adapter fine-tuning.

Importing this package loads torch and numpy only; integrations live in
``safefreeze.integrations`` and load their framework when imported.
"""

from safefreeze.config import SAFEConfig
from safefreeze.controller import FreezeCallback, FreezeController
from safefreeze.discovery import AdapterDiscoveryError, AdapterPair, AdapterPattern, find_adapter_pairs
from safefreeze.estimate import SavingsEstimate, estimate_savings
from safefreeze.optimizer import SAFEOptimizer
from safefreeze.plan import AdapterRecord, FreezeEvent, FreezePlan, PlanError, PlanMismatchError
from safefreeze.schedule import cubic_threshold

__version__ = "0.1.0"

__all__ = [
    "AdapterDiscoveryError",
    "AdapterPair",
    "AdapterPattern",
    "AdapterRecord",
    "FreezeCallback",
    "FreezeController",
    "FreezeEvent",
    "FreezePlan",
    "PlanError",
    "PlanMismatchError",
    "SAFEConfig",
    "SAFEOptimizer",
    "SavingsEstimate",
    "__version__",
    "cubic_threshold",
    "estimate_savings",
    "find_adapter_pairs",
]
