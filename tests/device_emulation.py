"""A CPU stand-in for an accelerator (a test double, named as such): tensors on the device `emu:0` (PyTorch's
PrivateUse1 backend, renamed, with a Python device guard so autograd accepts it) whose values live on the
CPU, and a dispatch mode that raises on any op mixing them with CPU tensors, as CUDA does.

Inside `emulated_device()`:
- `torch.randn(..., device=device())`, `t.to(device())`, `module.to(device())` give emulated tensors (their
  `.device` is emu:0, so code that follows `x.device` or a module's parameters keeps working);
- an op whose tensor arguments mix emulated and CPU tensors raises "Expected all tensors to be on the same
  device" (0-dim CPU tensors are allowed, as on CUDA; so are CPU index tensors of `aten.index`);
- a CPU generator used to draw on the device raises (CUDA wants a CUDA generator);
- `.cpu()` / `.to("cpu")` of an emulated tensor give plain CPU tensors.
`torch.cuda.is_available()` stays False: code under test must follow the device of its modules and inputs.
The backend rename lasts for the process: run emulated code in its own process (`run_isolated`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

NAME = "emu"  # PrivateUse1 renamed; a Python device guard makes autograd accept it (no CUDA runtime needed)
_setup_done = False


def _setup() -> None:
    global _setup_done
    if not _setup_done:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        class Hook(torch._C._acc.PrivateUse1Hooks):  # not "available": nothing picks it as the accelerator
            def is_available(self) -> bool:
                return False

            def has_primary_context(self, dev_id) -> bool:
                return True

            def is_built(self) -> bool:
                return True

        if torch._C._get_privateuse1_backend_name() == "privateuseone":
            _setup_privateuseone_for_python_backend(rename=NAME, hook=Hook())
        _setup_done = True


def device() -> torch.device:
    _setup()
    return torch.device(NAME, 0)




class CrossDeviceError(RuntimeError):
    pass


class Emulated(torch.Tensor):
    """A tensor that says it is on cuda:0; `elem` holds its values on the CPU."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=device(), requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # noqa: D105
        return f"Emulated({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise CrossDeviceError(f"{func}: an emulated CUDA tensor outside emulated_device()")


def _on_emu(device) -> bool:
    return device is not None and torch.device(device).type == NAME


class _Mode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0  # ops run on the emulated device (a test can assert the device was really used)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on, off = [], []
        check_args = args[:1] if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                                           torch.ops.aten.index_put.default) else args

        def scan(t):
            if isinstance(t, Emulated):
                on.append(t)
            elif isinstance(t, torch.Tensor) and t.dim() > 0:
                off.append(t)
            return t

        tree_map(scan, (check_args, kwargs))
        if on and off:
            raise CrossDeviceError(
                f"Expected all tensors to be on the same device, but found at least two devices, emu:0 (the emulated accelerator) and cpu! "
                f"({func}; cpu tensors of shapes {[tuple(t.shape) for t in off]})")
        device = kwargs.get("device")
        to_emu = _on_emu(device)
        gen = kwargs.get("generator")
        if to_emu and gen is not None and gen.device.type != "cuda":
            raise CrossDeviceError(f"{func}: a {gen.device} generator cannot draw on the accelerator "
                                   "(draw on the CPU, then move)")
        if device is not None:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        unwrap = lambda t: t.elem if isinstance(t, Emulated) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if not (to_emu or (on and device is None)):
            return out
        self.ops += 1
        return tree_map(lambda t: Emulated(t) if type(t) is torch.Tensor else t, out)


@contextlib.contextmanager
def emulated_device() -> Iterator[_Mode]:
    """Run the body with `cuda` emulated on the CPU (see the module docstring)."""
    _setup()

    mode = _Mode()
    originals = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def from_data(original):
        # Tensors built from Python data are made on the CPU below the dispatch modes: build them there, then
        # move them through the mode.
        def build(data, *args, device=None, **kwargs):
            if _on_emu(device):
                return original(data, *args, **kwargs).to(device)
            return original(data, *args, device=device, **kwargs)
        return build

    for name, fn in originals.items():
        setattr(torch, name, from_data(fn))
    try:
        with mode:
            yield mode
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def run_isolated(fn, *args, timeout: float = 600):
    """`fn(*args)` in a fresh spawned process, its result returned. The emulated device renames PyTorch's
    PrivateUse1 backend for the whole process, and autograd sizes its device queues once per process (before
    the first backward): both must happen in a process of its own. `fn` must be importable (module level)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(_isolated_call, (fn, args)).get(timeout)


def _isolated_call(fn, args):
    torch.set_num_threads(1)
    device()  # registered before any backward of the process
    return fn(*args)
