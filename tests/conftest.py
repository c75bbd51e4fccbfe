"""Settings every test process needs before any test module is imported."""
import os

# Triton reads TRITON_INTERPRET when it is first imported, and other test modules import it
# indirectly (torch.testing's optimizer database does): the Triton engine's tests run its
# kernels on CPU tensors in the interpreter, so it is set here, before any of them.
os.environ.setdefault("TRITON_INTERPRET", "1")
