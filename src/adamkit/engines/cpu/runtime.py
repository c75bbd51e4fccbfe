"""The Numba backend's runtime: whether Numba is there and how it is set up (threading layer,
vector width), the on-disk kernel module cache, the shared kernel table, and the two checks
that every step makes (:func:`unsupported_reason`, :func:`any_nonfinite`)."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor

#: bump when the generated code changes in a way the hashed sources do not show
KERNEL_FORMAT = 10

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_numba_state: dict = {}
_lock = threading.RLock()


def available() -> bool:
    """Whether numba can be imported (the fused engine's only extra dependency)."""
    if "ok" not in _numba_state:
        try:
            import numba

            _prefer_wide_vectors(numba)
            from . import numba_ops  # noqa: F401  (registers the overloads)

            if "NUMBA_THREADING_LAYER" not in os.environ and \
                    "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
                # OpenMP first: a kernel launch on it costs 2-4 us, on the workqueue layer
                # 50-200 us (its threads sleep between launches). Measured on 2 cores: a
                # training iteration of a 6.3M-parameter MLP with AdamW 39.5 ms (omp) vs 54 ms
                # (workqueue; torch fused AdamW 39.4 ms); FAdam on GPT-2 shapes at --scale 0.1
                # 32 vs 87 ms/step. TBB, then the workqueue, where OpenMP cannot be loaded.
                numba.config.THREADING_LAYER = "default"
                numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

            _numba_state["ok"] = True
        except Exception as error:  # ImportError, or a broken numba/llvmlite install
            _numba_state["ok"] = False
            _numba_state["error"] = f"{type(error).__name__}: {error}"
    return _numba_state["ok"]


def _prefer_wide_vectors(numba) -> None:
    """Let LLVM vectorize kernels with 512-bit registers on CPUs with AVX-512.

    LLVM's tuning for AVX-512 CPUs prefers 256-bit vectors; the int8 and bfloat16 codecs are
    compute-bound, and with 512-bit vectors the int8 Adam step is measured 1.4x faster (float32
    steps, bound by memory bandwidth, are unchanged). Numba takes target features per process,
    so this applies to every Numba function compiled in the process afterwards; it does not
    change results. Skipped where NUMBA_CPU_FEATURES is set or ADAMKIT_AVX512=0.
    """
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("ADAMKIT_AVX512", "1") == "0":
        return
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        if features.get("avx512f") and features.get("avx512bw") and features.get("avx512vl"):
            numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    except Exception:  # feature detection is best effort: the default is still correct
        pass


def unavailable_reason() -> str:
    available()
    return _numba_state.get("error", "")


def cache_dir() -> Path:
    """Where generated kernel modules and Numba's compiled code are kept."""
    if os.environ.get("ADAMKIT_CACHE_DIR"):
        return Path(os.environ["ADAMKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adamkit" / "kernels"


def unsupported_reason(t: Tensor) -> str | None:
    """Why the fused engine cannot update tensor ``t`` in place, or None if it can."""
    if t.is_cpu and t.dtype in _KINDS and not t.is_sparse and t.is_contiguous():
        return None  # the common case, first and cheap: this runs for every tensor and step
    if t.device.type != "cpu":
        return f"it is on device {t.device} (the fused engine runs on CPU)"
    if t.is_complex():
        return f"its dtype is {t.dtype} (complex parameters use the reference engine)"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"its dtype is {t.dtype} (the fused engine takes float32, float64 and bfloat16)"
    if t.is_sparse:
        return "it is sparse"
    if not t.is_contiguous():
        return "it is not contiguous"
    return None


#: elements per work item of the NaN/Inf check, read as four streams of 64K (16K-element
#: work items measured no faster with four streams than with one)
CHECK_CHUNK = 1 << 18


def any_nonfinite(tensors: Sequence[Tensor]) -> bool:
    """Whether any of the given contiguous CPU float tensors holds a NaN or Inf, read in one
    multithreaded pass over all of them (one launch per dtype)."""
    import numpy as np

    from . import numba_ops

    # one pass over the tensors, which this reads every step
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for t in tensors:
        n = t.numel()
        if n:
            tables = by_dtype.get(t.dtype)
            if tables is None:
                tables = by_dtype[t.dtype] = ([], [])
            tables[0].append(t.data_ptr())
            tables[1].append(n)
    for dtype, (pointers, sizes) in by_dtype.items():
        ns = np.array(sizes, dtype=np.int64)
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum((ns + (CHECK_CHUNK - 1)) // CHECK_CHUNK, out=starts[1:])
        addresses = np.array(pointers, dtype=np.uint64)
        element = {torch.float32: np.float32, torch.float64: np.float64,
                   torch.bfloat16: np.int16}[dtype]
        args = (addresses, ns, starts, CHECK_CHUNK, element)
        if _serialize_calls():
            with _lock:
                bad = numba_ops.chunks_nonfinite(*args)
        else:
            bad = numba_ops.chunks_nonfinite(*args)
        if bad:
            return True
    return False


def _engine_sources_digest() -> str:
    if "digest" not in _numba_state:
        import numba

        from ... import compiler
        from .. import ops
        from . import codegen, factored, numba_ops

        h = hashlib.sha256()
        # every module whose text shapes a kernel: the rule compiler, the code generators,
        # the Numba helpers the kernels call and the element helpers rules call
        for mod in (compiler.rules, codegen, factored, numba_ops, ops, sys.modules[__name__]):
            h.update(inspect.getsource(mod).encode())
        h.update(f"{KERNEL_FORMAT}|{numba.__version__}|{sys.version_info[:2]}".encode())
        _numba_state["digest"] = h.hexdigest()
    return _numba_state["digest"]


def _writable_cache_dir() -> Path:
    if "dir" not in _numba_state:
        path = cache_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError:
            path = Path(tempfile.mkdtemp(prefix="adamkit-kernels-"))
        _numba_state["dir"] = path
    return _numba_state["dir"]


_KERNELS: dict[tuple, Callable] = {}
_KINDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "b16"}


def _block_quantized():
    cls = _numba_state.get("BlockQuantized")
    if cls is None:
        from ...storage import BlockQuantized as cls  # storage imports this module's helpers

        _numba_state["BlockQuantized"] = cls
    return cls


def _serialize_calls() -> bool:
    """The workqueue threading layer must not be entered from two threads at once. Numba
    picks its layer at the first parallel launch; until then calls are serialized."""
    serialize = _numba_state.get("serialize")
    if serialize is None:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel launch yet
            return True
        serialize = _numba_state["serialize"] = layer == "workqueue"
    return serialize


def _load_module(source: str, module_sources: Sequence[str] = ()):
    """Import generated ``source`` from the kernel cache (written there first if new; named
    by a hash of it, of the engine's sources and of ``module_sources``, the rule's module)."""
    h = hashlib.sha256(source.encode())
    h.update(_engine_sources_digest().encode())
    for text in module_sources:
        h.update(text.encode())
    name = f"adamkit_kernel_{h.hexdigest()[:20]}"
    directory = _writable_cache_dir()
    path = directory / f"{name}.py"
    if not path.exists():
        tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(source)
        os.replace(tmp, path)
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
