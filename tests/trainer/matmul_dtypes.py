"""Records the dtypes of every matrix-multiply input (and attention) dispatched while it is active: a
`TorchDispatchMode` over aten's mm / addmm / bmm / baddbmm / linear / convolution and scaled-dot-product
attention, forward and backward. For the ops it sees in another dtype it keeps where they came from (the
innermost frames of this project's code), so a test can say which matmul is not bf16 and why."""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
           aten.convolution.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_cudnn_attention.default, aten.addbmm.default, aten.dot.default,
           aten.mv.default, aten.addmv.default}
FLOAT = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _where() -> str:
    """The innermost frames of this project's code (models/, trainer/, diffusers, peft) on the stack."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if any(k in f.filename for k in ("/models/", "/trainer/", "/diffusers/", "/peft/"))]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                       for f in frames[-3:][::-1])


class MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()  # (op, dtypes) -> calls
        self.other: collections.Counter = collections.Counter()  # (op, dtypes, where) of non-bf16 calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            dtypes = tuple(sorted({str(a.dtype).replace("torch.", "") for a in args[:3]
                                   if isinstance(a, torch.Tensor) and a.dtype in FLOAT}))
            name = str(func.overloadpacket.__name__)
            self.counts[(name, dtypes)] += 1
            if dtypes != ("bfloat16",):
                self.other[(name, dtypes, _where())] += 1
        return func(*args, **kwargs)

    def summary(self) -> dict:
        """{"counts": {"op dtypes": n}, "other": {"op dtypes @ where": n}} (JSON-friendly)."""
        return {"counts": {f"{op} {'/'.join(d)}": n for (op, d), n in sorted(self.counts.items())},
                "other": {f"{op} {'/'.join(d)} @ {w}": n for (op, d, w), n in sorted(self.other.items())}}
