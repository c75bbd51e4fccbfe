"""Rule source -> kernel source: the backend-neutral half of every generated engine.

A rule (``Adam.update``, FAdam's ``_update_pass``, ...) is compiled from its own source. This
module parses it and the same-module helpers it calls, and makes one mechanical change: wherever
an element value meets a Python scalar (a field of ``s`` or a literal) the scalar is rounded to
the element's compute type first (``_E(...)``, :class:`_ElementCasts`). That is torch's rule for
``tensor op python_scalar`` and keeps float32 rules in float32 arithmetic. It also finds the
rule's *uniform* decision points, the branches and exponents that depend on scalars alone
(``if s.amsgrad:``, ``fim ** s.power``): each combination of their outcomes becomes its own
kernel with only the taken branch (:class:`_UniformPoints`, :func:`rule_outcomes`,
:func:`block_outcomes`), so an element loop has no branch on a scalar and vectorizes.

What comes out (:class:`_RuleProgram`) is Python source of plain scalar functions plus the import
lines they need; a backend wraps it in its own loop and decorator (the Numba backend in
:mod:`adamkit.engines.cpu.codegen`). The element helpers a rule may call (``sqrt``, ``clamp``,
...) are the functions of the modules registered with :func:`element_helpers`
(:mod:`adamkit.engines.ops` registers itself); every backend gives them a scalar
implementation. This module imports neither the engines nor the front end.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import math
import re
import sys
import textwrap
from types import ModuleType
from typing import Callable

import torch

_HELPERS: list[ModuleType] = []


def element_helpers(module: ModuleType) -> None:
    """Register ``module``'s functions as element helpers that rules may call (the generated
    code imports them by name from that module)."""
    if module not in _HELPERS:
        _HELPERS.append(module)


class KernelUnsupported(Exception):
    """A map whose operands the generated kernels do not cover (the engine falls back)."""


# ---- rule source -> kernel source ---------------------------------------------------------


def _function_ast(fn: Callable) -> ast.FunctionDef:
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise KernelUnsupported(f"{fn.__qualname__} is not a plain function")
    node.decorator_list = []
    node.returns = None
    for arg in node.args.args:
        arg.annotation = None
    return node


class _ElementCasts(ast.NodeTransformer):
    """Round Python scalars to the element type where they meet element values.

    A value is an *element* value when it depends on a per-element argument (every argument
    after the first, the scalar namespace ``s``). Locals are classified by a fixpoint over their
    assignments.
    """

    def __init__(self, fn_node: ast.FunctionDef, local_functions: set[str]):
        self.local_functions = local_functions
        self.elements = {a.arg for a in fn_node.args.args[1:]}
        assigns: list[tuple[str, ast.AST]] = []
        for node in ast.walk(fn_node):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in self._target_names(target):
                        assigns.append((name, node.value))
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                for name in self._target_names(node.target):
                    assigns.append((name, node.value))
        changed = True
        while changed:
            changed = False
            for name, value in assigns:
                if name not in self.elements and self.is_element(value):
                    self.elements.add(name)
                    changed = True

    @staticmethod
    def _target_names(target) -> list[str]:
        if isinstance(target, ast.Name):
            return [target.id]
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for elt in target.elts for n in _ElementCasts._target_names(elt)]
        return []

    def is_element(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.elements
        if isinstance(node, ast.Constant):
            return False
        if isinstance(node, ast.Attribute):
            return self.is_element(node.value)
        if isinstance(node, ast.Call):
            return any(self.is_element(a) for a in node.args)
        return any(self.is_element(child) for child in ast.iter_child_nodes(node))

    @staticmethod
    def _cast(node):
        return ast.Call(func=ast.Name(id="_E", ctx=ast.Load()), args=[node], keywords=[])

    def _mixed(self, nodes: list) -> list:
        if any(self.is_element(n) for n in nodes):
            return [n if self.is_element(n) else self._cast(n) for n in nodes]
        return nodes

    def visit_BinOp(self, node):
        self.generic_visit(node)
        node.left, node.right = self._mixed([node.left, node.right])
        if isinstance(node.op, ast.Pow) and self.is_element(node.left):
            # element ** scalar: torch's pow takes fast paths (0.5 -> sqrt, 2 -> square, ...)
            return ast.Call(func=ast.Name(id="_pow", ctx=ast.Load()),
                            args=[node.left, node.right], keywords=[])
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        parts = self._mixed([node.left, *node.comparators])
        node.left, node.comparators = parts[0], parts[1:]
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        node.body, node.orelse = self._mixed([node.body, node.orelse])
        return node

    def visit_Assign(self, node):
        self.generic_visit(node)
        names = [n for t in node.targets for n in self._target_names(t)]
        if isinstance(node.targets[0], ast.Name) and names[0] in self.elements:
            if not self.is_element(node.value):
                node.value = self._cast(node.value)
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        if self.is_element(node.target) and not self.is_element(node.value):
            node.value = self._cast(node.value)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in self.local_functions:
            # arguments of the rule module's own helpers are element values (as in the caller)
            node.args = node.args[:1] + [
                a if self.is_element(a) else self._cast(a) for a in node.args[1:]
            ]
        elif isinstance(node.func, ast.Name) and node.func.id not in ("_E", "_pow"):
            # an ops helper given an element and a scalar (maximum(v, eps * eps)) works in the
            # element's dtype, as torch does with a Python scalar operand
            node.args = self._mixed(node.args)
        return node


def _free_names(node: ast.FunctionDef) -> set[str]:
    bound = {a.arg for a in node.args.args}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            bound.add(sub.id)
    loads = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)
             and isinstance(sub.ctx, ast.Load)}
    return loads - bound


class _UniformPoints(ast.NodeTransformer):
    """Decisions of a rule that are the same for every element: ``if`` tests and conditional
    expressions over the scalars only (``if s.amsgrad:``, ``if s.weight_decay != 0:``) and the
    exponents of ``element ** scalar``. Left in the kernel, they are branches inside the element
    loop, which LLVM does not always hoist, and the loop then does not vectorize (FAdam's
    ``fim ** s.power`` with int8 state ran 7x slower). The kernels are therefore compiled per
    outcome: ``collect`` numbers each point and its expression; ``resolve`` replaces each by
    the outcome in ``values`` (an outcome of None leaves the point as it is)."""

    SAFE_NAMES = {"s", "_E", "abs", "min", "max", "math"}

    def __init__(self, elements: "_ElementCasts", points: list, values=None):
        self.elements = elements
        self.points = points  # [(kind, expression source)], numbered as found
        self.values = values

    def _evaluable(self, node) -> bool:
        if self.elements.is_element(node):
            return False
        return all(n.id in self.SAFE_NAMES for n in ast.walk(node) if isinstance(n, ast.Name))

    def _point(self, node, kind, expr):
        # collecting numbers the point on the node itself (copies keep the number), so that
        # resolving finds it even where an enclosing branch was dropped
        if self.values is None:
            node.uniform_point = len(self.points)
            self.points.append((kind, ast.unparse(expr)))
            return None
        return self.values[node.uniform_point]

    def visit_If(self, node):
        if self._evaluable(node.test):
            outcome = self._point(node, "if", node.test)
            if outcome is not None:
                chosen = []
                for child in (node.body if outcome else node.orelse):
                    result = self.visit(child)
                    chosen.extend(result if isinstance(result, list) else [result])
                return chosen or [ast.Pass()]
        self.generic_visit(node)
        return node

    def visit_IfExp(self, node):
        if self._evaluable(node.test):
            outcome = self._point(node, "if", node.test)
            if outcome is not None:
                return self.visit(node.body if outcome else node.orelse)
        self.generic_visit(node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "_pow" \
                and self._evaluable(node.args[1]):
            exponent = self._point(node, "pow", node.args[1])
            base = node.args[0]
            if exponent == 0.5:  # the fast paths of numba_ops.scalar_pow, chosen once
                return ast.Call(func=ast.Name(id="_sqrt", ctx=ast.Load()), args=[base],
                                keywords=[])
            if exponent == 1.0:
                return base
            if exponent == 2.0:
                return ast.BinOp(left=base, op=ast.Mult(), right=base)
            if exponent == "other":
                node.func = ast.Name(id="_pow_general", ctx=ast.Load())
        return node


class _RuleProgram:
    """A rule translated for the kernels, with its uniform decision points (see
    :class:`_UniformPoints`); ``source(values)`` is the kernel text for one outcome."""

    def __init__(self, functions: dict, imports: list[str], module_sources: list[str]):
        self.functions = functions  # name -> (AST after element casts, _ElementCasts)
        self.imports = imports
        self.module_sources = module_sources
        self.points: list[tuple[str, str]] = []
        for fname in sorted(functions):
            node, elements = functions[fname]
            _UniformPoints(elements, self.points).visit(node)  # annotates, changes nothing
        body = ", ".join(f"({expr})" for _, expr in self.points)
        # the fields of s the outcomes depend on (all of s if it is used otherwise): the memo
        # key, so that scalars set per tensor (FAdam's clip factors) do not defeat the memo
        self.fields = None if re.search(r"\bs\b(?!\.)", body) else tuple(
            sorted(set(re.findall(r"\bs\.(\w+)", body))))
        namespace = {"math": math, "abs": abs, "min": min, "max": max}
        exec(f"def _evaluate(s, _E):\n    return ({body}{',' if self.points else ''})\n",
             namespace)
        self._evaluate = namespace["_evaluate"]

    def outcomes(self, s, dtype: torch.dtype) -> tuple:
        """The points' outcomes for scalars ``s`` (None where evaluation fails)."""
        if not self.points:
            return ()
        import numpy as np

        cast = np.float64 if dtype == torch.float64 else np.float32
        try:
            values = self._evaluate(s, cast)
        except Exception:
            return (None,) * len(self.points)
        out = []
        for (kind, _), value in zip(self.points, values):
            if kind == "if":
                out.append(bool(value))
            else:
                v = float(value)
                out.append(v if v in (0.5, 1.0, 2.0) else "other")
        return tuple(out)

    def source(self, values: tuple, decorator: str) -> str:
        """The rule's functions for outcomes ``values``, each under ``decorator`` (a line
        the backend chooses, e.g. Numba's ``@numba.njit(...)``)."""
        texts = []
        for fname in sorted(self.functions):
            node, elements = self.functions[fname]
            if values:
                node = _UniformPoints(elements, [], values).visit(_copy_ast(node))
                ast.fix_missing_locations(node)
            texts.append(decorator + ast.unparse(node))
        return "\n\n\n".join(texts)


def _copy_ast(node):
    import copy

    return copy.deepcopy(node)


_PROGRAMS: dict = {}
_OUTCOMES: dict = {}  # (rule, scalars, dtype) -> outcomes, for the step's other tensors


def _rule_program(fn: Callable) -> _RuleProgram:
    program = _PROGRAMS.get(fn)
    if program is None:
        program = _PROGRAMS[fn] = _translate(fn, "rule")
    return program


def block_outcomes(fn: Callable, s, dtype: torch.dtype, rows: int) -> list:
    """:func:`rule_outcomes` for a block of ``rows`` maps whose scalars ``s`` may hold NumPy
    arrays (one value per map): ``[(outcomes, indices)]`` per distinct outcome, ``indices``
    None when one outcome holds for all rows (the usual case: branches and exponents read
    hyperparameters, which a block shares)."""
    import numpy as np

    program = _PROGRAMS.get(fn) or _rule_program(fn)
    if not program.points:
        return [((), None)]
    read = s if program.fields is None else [getattr(s, f) for f in program.fields]
    if not any(isinstance(v, np.ndarray) for v in read):
        return [(rule_outcomes(fn, s, dtype), None)]
    found: dict = {}
    for i in range(rows):
        row = type(s)(*(float(v[i]) if isinstance(v, np.ndarray) else v for v in s))
        found.setdefault(rule_outcomes(fn, row, dtype), []).append(i)
    if len(found) == 1:
        return [(next(iter(found)), None)]
    return [(outcomes, np.array(indices, dtype=np.int64)) for outcomes, indices in found.items()]


def rule_outcomes(fn: Callable, s, dtype: torch.dtype) -> tuple:
    """The rule's scalar-only branch outcomes and exponents for scalars ``s`` (part of a
    kernel's identity). The tensors of a param group share their scalars, so the outcomes are
    memoized, not re-evaluated per tensor."""
    program = _PROGRAMS.get(fn) or _rule_program(fn)
    if not program.points:
        return ()
    memo = (fn, s if program.fields is None else tuple(getattr(s, f) for f in program.fields),
            dtype)
    try:
        outcomes = _OUTCOMES.get(memo)
    except TypeError:  # an unhashable scalar: evaluate every time
        return program.outcomes(s, dtype)
    if outcomes is None:
        outcomes = program.outcomes(s, dtype)
        if len(_OUTCOMES) > 4096:
            _OUTCOMES.clear()
        _OUTCOMES[memo] = outcomes
    return outcomes


def _translate(fn: Callable, name: str) -> _RuleProgram:
    """``fn`` (and the same-module helpers it calls) with element casts, as a
    :class:`_RuleProgram` (its import lines and the module sources hashed into kernel names).
    """
    module = sys.modules[fn.__module__]
    helpers = {k: (v, m.__name__) for m in _HELPERS for k, v in vars(m).items()
               if callable(v) and getattr(v, "__module__", "") == m.__name__}
    todo = [(fn, name)]
    done: dict[str, tuple] = {}
    imports: set[str] = set()
    while todo:
        func, fname = todo.pop()
        if fname in done:
            continue
        node = _function_ast(func)
        node.name = fname
        free = _free_names(node)
        local_functions = set()
        for ref in sorted(free):
            if ref in ("_E", "_pow") or (ref not in func.__globals__ and hasattr(builtins, ref)):
                continue
            value = func.__globals__.get(ref)
            if value is None:
                raise KernelUnsupported(f"{func.__qualname__}: unknown global {ref!r}")
            if ref in helpers and value is helpers[ref][0]:
                imports.add(f"from {helpers[ref][1]} import {ref}")
            elif inspect.ismodule(value) and value.__name__ in ("math", "numpy"):
                imports.add(f"import {value.__name__} as {ref}")
            elif inspect.isfunction(value) and value.__module__ == func.__module__:
                local_functions.add(ref)
                todo.append((value, ref))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                imports.add(f"{ref} = {value!r}")
            else:
                raise KernelUnsupported(
                    f"{func.__qualname__}: global {ref!r} cannot be compiled by the fused engine")
        elements = _ElementCasts(node, local_functions)
        node = elements.visit(node)
        ast.fix_missing_locations(node)
        done[fname] = (node, elements)
    return _RuleProgram(done, sorted(imports), [inspect.getsource(module)])
