"""Network-free policies of pi-Flow: GM (default) and DX (PIFLOW.md §2)."""
from models.policies.dx import DXPolicy, dx_x0_from_u
from models.policies.gm import GMPolicy

__all__ = ["GMPolicy", "DXPolicy", "dx_x0_from_u"]
