"""Network-free policies of pi-Flow: GM (default) and DX (PIFLOW.md §2)."""
from models.policies.dx import DXPolicy
from models.policies.gm import GMPolicy

__all__ = ["GMPolicy", "DXPolicy"]
