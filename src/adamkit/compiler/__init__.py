"""The rule compiler: an algorithm's per-element rule, read from its source, as kernel source
that any backend wraps in its own loop (see :mod:`adamkit.compiler.rules`)."""

from .rules import (KernelUnsupported, _rule_program, block_outcomes, element_helpers,
                    rule_outcomes)

__all__ = ["KernelUnsupported", "block_outcomes", "element_helpers", "rule_outcomes",
           "_rule_program"]
