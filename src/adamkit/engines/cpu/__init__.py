"""The fused CPU engine: one multithreaded pass over memory per ``map``, compiled with Numba.

It runs the primitives of the engine contract (:class:`~adamkit.engines.reference.ReferenceEngine`:
``map(fn, s, ins, outs, n_sums)``, ``mean_sq_last_dims``, ``sq_stats_last_dims``, ``sums_where``,
``mean_rows`` and ``per_tensor``) but evaluates ``fn`` element by element inside a generated
``numba.prange`` loop: every input is read once, every output written once, the per-tensor sums
are parallel reductions, and stored formats (bfloat16, 8-bit blockwise codes) are decoded on
load and encoded on store inside the same loop. No formula of an algorithm lives in this
package: kernels are generated from the rules' own source by :mod:`adamkit.compiler`.

Files:
  runtime.py    Numba set-up (threading layer, vector width), the on-disk kernel module cache,
                the kernel table, and the per-step checks (supported tensors, NaN/Inf scan)
  codegen.py    the Numba target of the rule compiler: a kernel module per rule and layout
  factored.py   kernels for factored second moments (Adafactor's row and column statistics)
  batch.py      launch tables: KernelBatch runs each kernel once over all tensors of a step
  engine.py     FusedEngine, the engine a rule's ``apply`` talks to
  numba_ops.py  Numba implementations of the element helpers, codecs and pointer intrinsics

Kernels are written as Python modules into the kernel cache directory and compiled with
``cache=True``, so a later process loads machine code instead of compiling:
``$ADAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamkit/kernels``, else
``~/.cache/adamkit/kernels``. File names carry a hash of the generated source, of the rule's
module and of the modules that shape kernels, so editing a rule never runs a stale kernel.

Coverage: CPU tensors of dtype float32, float64 or bfloat16 (computed in float32), contiguous.
Operands of ``map`` may also be Python numbers (broadcast), ``None`` (an inactive slot) and
:class:`adamkit.storage.BlockQuantized` state. Anything else (non-contiguous or complex tensors,
CUDA) is the reference engine's job; the front end decides that per parameter.
"""

from .batch import KernelBatch, Pending, operand_column, operand_columns
from .engine import FusedEngine
from .runtime import (CHECK_CHUNK, SUPPORTED_DTYPES, any_nonfinite, available, cache_dir,
                      unavailable_reason, unsupported_reason)

__all__ = ["CHECK_CHUNK", "SUPPORTED_DTYPES", "FusedEngine", "KernelBatch", "Pending",
           "any_nonfinite", "available", "cache_dir", "operand_column", "operand_columns",
           "unavailable_reason", "unsupported_reason"]
