"""The GPU backend: Triton kernels generated from the same rules as the CPU engine.

``backend="triton"`` runs every step here: each map a rule's ``apply`` makes is queued and the
queue runs one launch per kernel for all tensors of the step (a table of pointers, sizes and
per-tensor scalars, as torch's multi-tensor kernels; :mod:`.codegen`); a multi-pass rule
(FAdam, Adafactor) advances all tensors' passes together and reads each pass's per-tensor sums
back on the host, where its ``apply`` turns them into the next pass's scalars. Parameters are
float32, bfloat16 or float16, computed in float32; state is float32 or bfloat16 (encoded in
the kernel; stochastic rounding draws the CPU engine's random bits) or int8 (today decoded to
float32 before the kernels and encoded after, with the CPU format and code: not yet inside
the kernel). ``on_nonfinite="skip"`` is decided on the device: a kernel sets a flag where a
gradient holds NaN or Inf and the update kernels write nothing when it is set; ``step()`` reads
the flag once, after every launch, to keep the step counts. Maps with broadcast operands
(Adafactor's factored passes) and the other engine primitives run as torch operations.

``backend="auto"`` picks this engine for CUDA parameters when Triton imports. With
``TRITON_INTERPRET=1`` (Triton's interpreter) it also runs on CPU tensors: that is how the
tests run without a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

_IMPORT_ERROR: str | None = None
_checked = False


def available() -> bool:
    """Whether Triton can be imported."""
    global _checked, _IMPORT_ERROR
    if not _checked:
        _checked = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERROR is None


def unavailable_reason() -> str:
    available()
    return _IMPORT_ERROR or ""


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_RECORDING = False


@contextlib.contextmanager
def _recording():
    """Accept any device while kernels are recorded, not run (``adamkit kernels``)."""
    global _RECORDING
    _RECORDING, saved = True, _RECORDING
    try:
        yield
    finally:
        _RECORDING = saved


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def device_reason(t: torch.Tensor) -> str | None:
    """Why Triton cannot run on ``t``'s device (None: it can)."""
    if t.is_cuda:
        return None
    if t.device.type == "cpu" and (interpreting() or _RECORDING):
        return None
    return (f"it is on {t.device.type}, and Triton runs on CUDA tensors (CPU tensors only "
            "with TRITON_INTERPRET=1, Triton's interpreter)")


def unsupported_reason(p: torch.Tensor) -> str | None:
    """Why the generated kernels cannot update ``p`` (None: they can; otherwise the step
    runs it on the reference engine)."""
    if p.dtype not in SUPPORTED_DTYPES:
        return f"its dtype is {p.dtype} (the Triton kernels take float32, bfloat16, float16)"
    if not p.is_contiguous():
        return "it is not contiguous"
    return device_reason(p)


def check_backend() -> None:
    """The constructor's check for ``backend="triton"``."""
    if not available():
        raise ValueError(
            "backend='triton' needs Triton, which could not be imported "
            f"({unavailable_reason()}); install adamkit[gpu] (pip install triton) or use "
            "backend='auto'")


def check_param(p: torch.Tensor, where: str) -> None:
    """``add_param_group``'s check for ``backend="triton"``: the device must be one Triton
    runs on (other reasons, a float64 parameter, fall back to the reference engine)."""
    reason = device_reason(p)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot update {where}: {reason}; use "
                         "backend='auto' or 'reference'")


def chosen(opt) -> bool:
    """Whether ``opt``'s step runs on this engine: ``backend="triton"``, or ``"auto"`` with
    CUDA parameters and Triton installed."""
    if opt.backend == "triton":
        return True
    if opt.backend != "auto":
        return False
    for group in opt.param_groups:
        for p in group["params"]:
            return p.is_cuda and available()
    return False


def step(opt) -> None:
    """``Optimizer.step`` on the Triton engine (the closure, if any, already ran)."""
    from .engine import step as _step

    _step(opt)
