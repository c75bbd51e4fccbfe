"""The Cautious modifier (Liang et al., 2024, "Cautious Optimizers"; kyleliang919/C-Optim).

``cautious=True`` on an optimizer with a momentum or first moment applies its update only where
the update and the gradient agree in sign, rescaled by the fraction that agrees:

.. math::
    \\phi = \\mathbb{1}(u \\odot g > 0), \\quad
    \\theta \\leftarrow \\theta - \\frac{\\phi}{\\max(\\mathrm{mean}(\\phi), 10^{-3})} \\odot u

with the mean over the whole tensor (the repository's current ``c_adamw.py``). The stored moments
are not masked; decoupled weight decay is applied unmasked, before. With every sign agreeing the
scale is exactly 1 and the rule is unchanged bit for bit.

Written once, here: a rule takes the modifier by carrying ``cautious`` and ``cautious_scale``
in its scalars (``CAUTIOUS_FIELDS``) and, in a uniform ``if s.cautious:`` branch, returning
``p`` with the masked update (:func:`masked`) and, as an extra last result, the mask
(:func:`agreement`). :class:`Cautious` turns such a rule into the two-pass program the mean needs
(like FAdam's): the first pass sums the mask (nothing is written), the second applies the update
with ``cautious_scale = 1 / max(sum / n, 1e-3)``. Optimizers with ``cautious=False`` keep their
single-pass path untouched.

adamkit's choices: ``g`` in the mask is the gradient as the rule uses it (after ``maximize``
and after coupled weight decay; C-Optim's AdamW has decoupled decay only); a NaN in ``u * g``
makes the mean, and so the tensor's update, NaN (C-Optim counts it as disagreeing).
"""

from __future__ import annotations

import inspect
import sys

from ..compiler import _rule_program, element_helpers
from ..engines.ops import maximum, sign

#: mask mean below which the scale stops growing (C-Optim's 1e-3)
MIN_MEAN = 1e-3


def agreement(u, g):
    """1 where ``u`` and ``g`` have the same sign (``u * g > 0``), else 0."""
    agree = sign(u * g)
    # agree - agree is a zero of the element's type (a 0.0 literal would widen float32 to
    # float64 in a compiled kernel: this module is not run through the rule compiler's casts)
    return maximum(agree, agree - agree)


def masked(u, g, scale):
    """``u`` where it agrees in sign with ``g``, times ``scale``; 0 elsewhere."""
    return u * (agreement(u, g) * scale)


element_helpers(sys.modules[__name__])  # rules may call agreement() and masked()

_numba_registered = False


def _register_numba() -> None:
    # the fused kernels call agreement()/masked() as compiled functions (their body is made of
    # ops helpers, which numba_ops implements)
    global _numba_registered
    if _numba_registered:
        return
    from numba.extending import register_jitable

    register_jitable(agreement)
    register_jitable(masked)
    _numba_registered = True


def _hash_with_rule(fn) -> None:
    # the fused kernels' cache names hash the rule's module, not this one: add this module's
    # text to what is hashed for a rule that calls agreement()/masked(), so that editing them
    # never runs a stale compiled kernel
    program = _rule_program(fn)
    source = inspect.getsource(sys.modules[__name__])
    if source not in program.module_sources:
        program.module_sources.append(source)


def _cautious_apply(self, engine, s, p, g, slots):
    """The two-pass program of a rule under ``cautious=True`` (a generator: see
    ``Optimizer.apply``)."""
    tensors = [slots.get(name) for name in self.slot_names]
    ins = [p, g, *tensors]
    if not s.cautious:  # a group without the modifier: the rule's own single pass
        engine.map(self.update, s, ins, [p, *tensors])
        return
    if engine.name != "reference":
        _register_numba()
    (agree,) = yield engine.map(self.update, s, ins, [None] * (1 + len(tensors)), n_sums=1)
    n = p.numel()
    scale = 1.0 / maximum(agree / n, MIN_MEAN) if n else 1.0
    engine.map(self.update, s._replace(cautious_scale=scale), ins, [p, *tensors], n_sums=1)


_SUBCLASSES: dict[type, type] = {}


def _cautious_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        # named in this module so that pickle finds it; __name__ stays the public one
        qualname = f"_Cautious_{cls.__module__.replace('.', '_')}_{cls.__qualname__}"
        sub = _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "apply": _cautious_apply, "__module__": __name__, "__qualname__": qualname,
            "__doc__": cls.__doc__, "_cautious_base": cls,
        })
        setattr(sys.modules[__name__], qualname, sub)
    return sub


class Cautious:
    """Mixin for optimizers that take ``cautious``: a param group with ``cautious=True`` switches
    the instance to the two-pass program (a subclass of its class with the generic ``apply``
    above); without one the optimizer is exactly its class."""

    _cautious_base = None

    def setup_group(self, group: dict) -> None:
        super().setup_group(group)
        _hash_with_rule(type(self).update)
        if group.get("cautious") and self._cautious_base is None:
            self.__class__ = _cautious_class(type(self))
            self.__dict__.pop("_plans", None)
            self.__dict__.pop("_group_plans", None)
