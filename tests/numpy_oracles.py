"""Independent float64 NumPy statements of the update rules in ALGORITHMS.md.

These oracles are written from the formulas in ``ALGORITHMS.md`` (the numerical contract) and
deliberately not from adamkit's own code, so that a test comparing the two catches a misreading
in either. Each oracle:

- takes a list of float64 ``np.ndarray`` parameters (one param group's worth of hyperparameters),
- updates those arrays in place on ``step(grads, lr=None)``; ``lr`` overrides the current lr from
  that step on (what an LR scheduler does to ``param_group["lr"]``),
- exposes its per-parameter state in ``self.state[i]`` under the names adamkit uses, and the step
  count (the same for every parameter) in ``self.t``.

Notation (ALGORITHMS.md): ``t`` is incremented before use (first step t = 1), γ the current lr,
λ weight_decay, bc1 = 1 − β₁ᵗ, bc2 = 1 − β₂ᵗ. ``maximize=True`` means g ← −g first.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "AdaBoundOracle",
    "AdaModOracle",
    "AdaBeliefOracle",
    "LionOracle",
    "FAdamOracle",
    "AdafactorOracle",
    "ADOPTOracle",
    "CautiousAdamOracle",
    "CautiousSGDOracle",
    "cautious_update",
]


def _rms(x: np.ndarray) -> float:
    """Root mean square over the whole tensor; 0 for a tensor with no elements."""
    if x.size == 0:
        return 0.0
    return math.sqrt(float(np.mean(np.square(x))))


class _Oracle:
    """Shared bookkeeping: parameters, lr override, step count, gradient sign."""

    def __init__(self, params: list[np.ndarray], lr: float, maximize: bool) -> None:
        for p in params:
            if p.dtype != np.float64:
                raise TypeError("oracles compute in float64; got " + str(p.dtype))
        self.params = params
        self.lr = float(lr)
        self.maximize = bool(maximize)
        self.t = 0
        self.state: list[dict[str, np.ndarray]] = [{} for _ in params]

    def _begin_step(self, grads: list[np.ndarray], lr: float | None) -> list[np.ndarray]:
        if len(grads) != len(self.params):
            raise ValueError("one gradient per parameter")
        if lr is not None:
            self.lr = float(lr)
        self.t += 1
        out = []
        for p, g in zip(self.params, grads):
            g = np.array(g, dtype=np.float64)  # a copy: never write into the caller's gradient
            if g.shape != p.shape:
                raise ValueError(f"gradient shape {g.shape} != parameter shape {p.shape}")
            out.append(-g if self.maximize else g)
        return out


class AdaBoundOracle(_Oracle):
    """AdaBound / AMSBound (official code, Luolc/AdaBound), as ALGORITHMS.md states it.

    Defaults lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0,
    amsbound=False. Requires 0 ≤ gamma < 1 and final_lr ≥ 0.
    Coupled decay. m, v as Adam (AMSBound: v_max ← max(v_max, v) over raw v, used instead of v).
    step = γ·√bc2/bc1 (ε-hat form). final_lr' = final_lr·γ/γ₀ where γ₀ is the group's lr when the
    group was created, so an lr schedule moves the bounds too.
    lower = final_lr'·(1 − 1/(gamma·t + 1)); upper = final_lr'·(1 + 1/(gamma·t)).
    η = clamp(step / (√v + ε), lower, upper) elementwise; θ ← θ − η·m (raw m).
    `decoupled_weight_decay=True` replaces coupled decay with θ(1 − γλ).

    "m, v as Adam": m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g².
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.initial_lr = float(lr)  # γ₀: the lr when the group was created
        self.beta1, self.beta2 = betas
        self.final_lr = final_lr
        self.gamma = gamma
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsbound = amsbound
        self.decoupled_weight_decay = decoupled_weight_decay
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_sq"] = np.zeros_like(p)
            if amsbound:
                st["max_exp_avg_sq"] = np.zeros_like(p)

    def bounds(self) -> tuple[float, float]:
        """(lower, upper) for the current t and lr."""
        t = self.t
        final_lr = self.final_lr * self.lr / self.initial_lr
        lower = final_lr * (1.0 - 1.0 / (self.gamma * t + 1.0))
        # gamma = 0 is allowed: 1/(gamma·t) is then +inf, i.e. no upper bound.
        upper = final_lr * (1.0 + 1.0 / (self.gamma * t)) if self.gamma * t != 0 else math.inf
        return lower, upper

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t = self.lr, self.t
        beta1, beta2 = self.beta1, self.beta2
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        lower, upper = self.bounds()
        for p, g, st in zip(self.params, grads, self.state):
            if self.weight_decay != 0:
                if self.decoupled_weight_decay:
                    p *= 1.0 - lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p
            m = st["exp_avg"]
            v = st["exp_avg_sq"]
            m[...] = beta1 * m + (1.0 - beta1) * g
            v[...] = beta2 * v + (1.0 - beta2) * g * g
            if self.amsbound:
                v_max = st["max_exp_avg_sq"]
                v_max[...] = np.maximum(v_max, v)
                denom = np.sqrt(v_max) + self.eps
            else:
                denom = np.sqrt(v) + self.eps
            eta = np.clip(step_size / denom, lower, upper)
            p -= eta * m


class AdaModOracle(_Oracle):
    """AdaMod (official code, lancopku/AdaMod), as ALGORITHMS.md states it.

    Defaults lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.
    No coupled decay; if λ ≠ 0, θ ← θ − λγθ before the update. m, v as Adam.
    η = γ·√bc2/bc1 / (√v + ε) elementwise; s ← β₃s + (1−β₃)η with s₀ = 0 and NO bias correction
    (this acts as a built-in warm-up); θ ← θ − min(η, s)·m. State `exp_avg_lr`.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.beta3 = beta3
        self.eps = eps
        self.weight_decay = weight_decay
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_sq"] = np.zeros_like(p)
            st["exp_avg_lr"] = np.zeros_like(p)

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t = self.lr, self.t
        beta1, beta2, beta3 = self.beta1, self.beta2, self.beta3
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        for p, g, st in zip(self.params, grads, self.state):
            if self.weight_decay != 0:
                p -= self.weight_decay * lr * p
            m = st["exp_avg"]
            v = st["exp_avg_sq"]
            s = st["exp_avg_lr"]
            m[...] = beta1 * m + (1.0 - beta1) * g
            v[...] = beta2 * v + (1.0 - beta2) * g * g
            eta = step_size / (np.sqrt(v) + self.eps)
            s[...] = beta3 * s + (1.0 - beta3) * eta
            p -= np.minimum(eta, s) * m


class AdaBeliefOracle(_Oracle):
    """AdaBelief (official code, version 0.2), as ALGORITHMS.md states it.

    Defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0, decoupled_weight_decay=True,
    rectify=True, amsgrad=False.
    Decay decoupled θ(1 − γλ) by default, coupled if `decoupled_weight_decay=False`.
    m ← β₁m + (1−β₁)g; s ← β₂s + (1−β₂)(g − m)² + ε (the NEW m; ε is added into the state every
    step). amsgrad: s_max ← max(s_max, s).
    rectify=False: θ ← θ − (γ/bc1)·m/(√s/√bc2 + ε).
    rectify=True: the RAdam branch with threshold ρₜ ≥ 5 using √s + ε (ε-hat form); below the
    threshold a momentum-SGD step θ ← θ − γ·m/bc1.

    The RAdam branch (from the RAdam section): ρ∞ = 2/(1−β₂) − 1; ρₜ = ρ∞ − 2tβ₂ᵗ/bc2;
    r = √((ρₜ−4)(ρₜ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρₜ)), θ ← θ − γ·(m/bc1)·r·√bc2/(√s + ε).

    Reading taken here, word for word and as the official v0.2 code does: with amsgrad, s_max
    replaces s in the rectify=False denominator (otherwise amsgrad would do nothing), but the
    rectified branch reads "√s + ε" with the running s, NOT s_max (the official code divides by
    `exp_avg_var.sqrt()` there even with amsgrad). Below the threshold no denominator is used.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        rectify: bool = True,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.decoupled_weight_decay = decoupled_weight_decay
        self.rectify = rectify
        self.amsgrad = amsgrad
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_var"] = np.zeros_like(p)
            if amsgrad:
                st["max_exp_avg_var"] = np.zeros_like(p)

    def rho(self) -> tuple[float, float]:
        """(ρ∞, ρₜ) for the current t."""
        beta2, t = self.beta2, self.t
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
        return rho_inf, rho_t

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t, eps = self.lr, self.t, self.eps
        beta1, beta2 = self.beta1, self.beta2
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        rho_inf, rho_t = self.rho()
        for p, g, st in zip(self.params, grads, self.state):
            if self.weight_decay != 0:
                if self.decoupled_weight_decay:
                    p *= 1.0 - lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p
            m = st["exp_avg"]
            s = st["exp_avg_var"]
            m[...] = beta1 * m + (1.0 - beta1) * g
            residual = g - m  # uses the NEW m
            s[...] = beta2 * s + (1.0 - beta2) * residual * residual + eps
            if self.amsgrad:
                s_max = st["max_exp_avg_var"]
                s_max[...] = np.maximum(s_max, s)
            if not self.rectify:
                s_denom = st["max_exp_avg_var"] if self.amsgrad else s
                denom = np.sqrt(s_denom) / math.sqrt(bias_correction2) + eps
                p -= (lr / bias_correction1) * m / denom
            elif rho_t >= 5.0:
                r = math.sqrt(
                    (rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                    / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
                )
                # the running s even with amsgrad (see the docstring)
                p -= lr * (m / bias_correction1) * r * math.sqrt(bias_correction2) / (
                    np.sqrt(s) + eps
                )
            else:
                p -= lr * m / bias_correction1


class LionOracle(_Oracle):
    """Lion (official code, google/automl), as ALGORITHMS.md states it.

    Defaults lr=1e-4, betas=(0.9, 0.99), weight_decay=0.
    θ ← θ(1 − γλ); c = β₁m + (1−β₁)g; θ ← θ − γ·sign(c) (sign(0) = 0); m ← β₂m + (1−β₂)g.
    No ε, no bias correction.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.weight_decay = weight_decay
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr = self.lr
        beta1, beta2 = self.beta1, self.beta2
        for p, g, st in zip(self.params, grads, self.state):
            p *= 1.0 - lr * self.weight_decay
            m = st["exp_avg"]
            c = beta1 * m + (1.0 - beta1) * g
            p -= lr * np.sign(c)  # np.sign(0) == 0
            m[...] = beta2 * m + (1.0 - beta2) * g


class FAdamOracle(_Oracle):
    """FAdam (the paper's reference code, "v3" algorithm), as ALGORITHMS.md states it.

    Defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5, weight_decay=0.1.
    β̂₂ = β₂(1 − β₂ᵗ⁻¹)/(1 − β₂ᵗ) (zero at t = 1); f ← β̂₂f + (1−β̂₂)g² (diagonal empirical Fisher).
    εₜ = ε·min(1, RMS(g)) where RMS is over the whole tensor.
    ḡ = g/(fᵖ + εₜ); ḡ ← ḡ / (max(1, RMS(ḡ))/clip).
    m ← β₁m + (1−β₁)ḡ (m is not bias-corrected).
    w = θ/(fᵖ + εₜ); w ← w / (max(1, RMS(w))/clip).
    θ ← θ − γ·(m + λw).

    State: `exp_avg` is m, `fim` is f. For the tests, ``last_rms[i]`` holds (RMS(ḡ), RMS(w)) of the
    last step before clipping, so a test can check that clipping did (or did not) trigger.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = 1.0,
        p: float = 0.5,
        weight_decay: float = 0.1,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.clip = clip
        self.p = p
        self.weight_decay = weight_decay
        self.last_rms: list[tuple[float, float]] = [(0.0, 0.0) for _ in params]
        for theta, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(theta)
            st["fim"] = np.zeros_like(theta)

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t = self.lr, self.t
        beta1, beta2 = self.beta1, self.beta2
        beta2_hat = beta2 * (1.0 - beta2 ** (t - 1)) / (1.0 - beta2**t)
        for i, (theta, g, st) in enumerate(zip(self.params, grads, self.state)):
            m = st["exp_avg"]
            f = st["fim"]
            f[...] = beta2_hat * f + (1.0 - beta2_hat) * g * g
            eps_t = self.eps * min(1.0, _rms(g))
            fisher_denom = f**self.p + eps_t
            g_nat = g / fisher_denom
            rms_g_nat = _rms(g_nat)
            g_nat = g_nat / (max(1.0, rms_g_nat) / self.clip)
            m[...] = beta1 * m + (1.0 - beta1) * g_nat
            w = theta / fisher_denom
            rms_w = _rms(w)
            w = w / (max(1.0, rms_w) / self.clip)
            theta -= lr * (m + self.weight_decay * w)
            self.last_rms[i] = (rms_g_nat, rms_w)


class AdafactorOracle(_Oracle):
    """Adafactor, torch semantics, as ALGORITHMS.md states it.

    Defaults lr=1e-2, beta2_decay=−0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.
    β̂ = 1 − t^beta2_decay; ρ = min(γ, 1/√t); α = max(eps₂, RMS(θ))·ρ; decoupled θ(1 − γλ).
    Tensors with ≥ 2 dims keep row and column means of g² (factored), others a full EMA of g².
    V̂ = R·C / max(mean(R), eps₁) (factored); U = g / max(√V̂, eps₁); Û = U / max(1, RMS(U)/d);
    θ ← θ − αÛ. eps₁ = None means the dtype's machine epsilon.

    Details that "torch semantics" fixes and the formula lines leave implicit:
    - α uses RMS(θ) from before the decay of this step (the lines list α before the decay);
    - the EMAs are R ← β̂R + (1−β̂)·mean_row(g²), C ← β̂C + (1−β̂)·mean_col(g²), v ← β̂v + (1−β̂)g²;
      R has g's shape with the last dim 1 (mean over the last dim), C has g's shape with dim −2
      set to 1 (mean over dim −2); mean(R) is over dim −2, so it broadcasts per leading batch.
    State names: `row_var`, `col_var` (≥ 2 dims), else `variance`.
    A parameter with no elements is left as it is (torch itself raises ZeroDivisionError there).
    """

    def __init__(
        self,
        params: list[np.ndarray],
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, maximize)
        self.beta2_decay = beta2_decay
        eps1, eps2 = eps
        self.eps1 = float(np.finfo(np.float64).eps) if eps1 is None else eps1
        self.eps2 = eps2
        self.d = d
        self.weight_decay = weight_decay
        for p, st in zip(params, self.state):
            if p.ndim >= 2:
                st["row_var"] = np.zeros(p.shape[:-1] + (1,))
                st["col_var"] = np.zeros(p.shape[:-2] + (1,) + p.shape[-1:])
            else:
                st["variance"] = np.zeros_like(p)

    def step(self, grads: list[np.ndarray], lr: float | None = None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t = self.lr, self.t
        beta2_hat = 1.0 - t**self.beta2_decay
        rho = min(lr, 1.0 / math.sqrt(t))
        eps1 = self.eps1
        for p, g, st in zip(self.params, grads, self.state):
            if p.size == 0:
                continue
            alpha = max(self.eps2, _rms(p)) * rho
            p *= 1.0 - lr * self.weight_decay
            g_sq = g * g
            if p.ndim >= 2:
                row_var = st["row_var"]
                col_var = st["col_var"]
                row_var[...] = beta2_hat * row_var + (1.0 - beta2_hat) * g_sq.mean(
                    axis=-1, keepdims=True
                )
                col_var[...] = beta2_hat * col_var + (1.0 - beta2_hat) * g_sq.mean(
                    axis=-2, keepdims=True
                )
                row_var_mean = row_var.mean(axis=-2, keepdims=True)
                var_estimate = row_var * col_var / np.maximum(row_var_mean, eps1)
            else:
                variance = st["variance"]
                variance[...] = beta2_hat * variance + (1.0 - beta2_hat) * g_sq
                var_estimate = variance
            update = g / np.maximum(np.sqrt(var_estimate), eps1)
            update = update / max(1.0, _rms(update) / self.d)
            p -= alpha * update


def cautious_update(u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The Cautious modifier (C-Optim's c_adamw.py, as ALGORITHMS.md states it): φ = 1(u ⊙ g > 0),
    φ̃ = φ / max(mean(φ), 1e-3) with the mean over the tensor; the update applied is φ̃ ⊙ u."""
    if u.size == 0:
        return u
    mask = (u * g > 0).astype(np.float64)
    return u * (mask / max(float(mask.mean()), 1e-3))


class ADOPTOracle(_Oracle):
    """ADOPT (official code iShohei220/adopt, adopt.py at c621db2), as ALGORITHMS.md states it.

    Defaults lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip c(k) = k**0.25, weight_decay=0,
    decouple=False. Coupled decay g ← g + λθ (every step, the first too). First step: v ← g²,
    nothing else. After it (k = t − 1 earlier steps): decoupled θ ← θ(1 − γλ);
    n = clip(g / max(√v, ε), −c(k), c(k)); m ← β₁m + (1−β₁)n; θ ← θ − γm (cautious: the masked
    γm); v ← β₂v + (1−β₂)g² after the update.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_lambda="default",
                 weight_decay=0.0, decouple=False, maximize=False, cautious=False) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.clip = (lambda k: k**0.25) if clip_lambda == "default" else clip_lambda
        self.weight_decay = weight_decay
        self.decouple = decouple
        self.cautious = cautious
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_sq"] = np.zeros_like(p)

    def step(self, grads, lr=None) -> None:
        grads = self._begin_step(grads, lr)
        lr, wd = self.lr, self.weight_decay
        for p, g, st in zip(self.params, grads, self.state):
            if wd != 0 and not self.decouple:
                g = g + wd * p
            if self.t == 1:
                st["exp_avg_sq"] = g * g
                continue
            if wd != 0 and self.decouple:
                p *= 1.0 - lr * wd
            n = g / np.maximum(np.sqrt(st["exp_avg_sq"]), self.eps)
            if self.clip is not None:
                c = self.clip(self.t - 1)
                n = np.clip(n, -c, c)
            st["exp_avg"] = self.beta1 * st["exp_avg"] + (1.0 - self.beta1) * n
            u = lr * st["exp_avg"]
            p -= cautious_update(u, g) if self.cautious else u
            st["exp_avg_sq"] = self.beta2 * st["exp_avg_sq"] + (1.0 - self.beta2) * g * g


class CautiousAdamOracle(_Oracle):
    """Adam / AdamW (torch semantics, ALGORITHMS.md) with the Cautious modifier: decoupled decay
    θ(1 − γλ) unmasked first (coupled: g ← g + λθ, and that g in the mask); m, v as Adam, not
    masked; u = (γ/bc1)·m/(√v/√bc2 + ε) (amsgrad: v_max over raw v); θ ← θ − φ̃ ⊙ u."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False,
                 cautious=True) -> None:
        super().__init__(params, lr, maximize)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.amsgrad = eps, weight_decay, amsgrad
        self.decoupled, self.cautious = decoupled_weight_decay, cautious
        for p, st in zip(params, self.state):
            st["exp_avg"] = np.zeros_like(p)
            st["exp_avg_sq"] = np.zeros_like(p)
            if amsgrad:
                st["max_exp_avg_sq"] = np.zeros_like(p)

    def step(self, grads, lr=None) -> None:
        grads = self._begin_step(grads, lr)
        lr, t, wd = self.lr, self.t, self.weight_decay
        bc1, bc2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
        for p, g, st in zip(self.params, grads, self.state):
            if wd != 0:
                if self.decoupled:
                    p *= 1.0 - lr * wd
                else:
                    g = g + wd * p
            st["exp_avg"] = self.beta1 * st["exp_avg"] + (1.0 - self.beta1) * g
            st["exp_avg_sq"] = self.beta2 * st["exp_avg_sq"] + (1.0 - self.beta2) * g * g
            v = st["exp_avg_sq"]
            if self.amsgrad:
                st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], v)
                v = st["max_exp_avg_sq"]
            u = (lr / bc1) * st["exp_avg"] / (np.sqrt(v) / math.sqrt(bc2) + self.eps)
            p -= cautious_update(u, g) if self.cautious else u


class CautiousSGDOracle(_Oracle):
    """SGD with momentum (torch semantics, ALGORITHMS.md) with the Cautious modifier: coupled
    decay; b = g at the first step, then μb + (1−τ)g; d = g + μb (Nesterov) or b; u = γd;
    θ ← θ − φ̃ ⊙ u with the mask against the (decayed) gradient."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, cautious=True) -> None:
        super().__init__(params, lr, maximize)
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov, self.cautious = weight_decay, nesterov, cautious

    def step(self, grads, lr=None) -> None:
        grads = self._begin_step(grads, lr)
        for p, g, st in zip(self.params, grads, self.state):
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            d = g
            if self.momentum != 0:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.copy()
                else:
                    st["momentum_buffer"] = (self.momentum * st["momentum_buffer"]
                                             + (1.0 - self.dampening) * g)
                d = g + self.momentum * st["momentum_buffer"] if self.nesterov \
                    else st["momentum_buffer"]
            u = self.lr * d
            p -= cautious_update(u, g) if self.cautious else u
