"""``StochasticCubicNewton``: a ``torch.optim.Optimizer`` for cubic Newton with momentum.

Chayti, Doikov & Jaggi, *Improving Stochastic Cubic Newton with Momentum* (AISTATS 2025), spec §3.
The optimizer works on the flattened vector x of all its parameters. The caller (see
``modules/cubic_newton.py``) asks for the oracle points with :meth:`evaluation_points`, computes the
stochastic gradient ĝ_t at y_t and the stochastic Hessian Ĥ_t (or an HVP) at z_t, and passes them to
:meth:`step`, which updates the momenta, solves the subproblem and writes x_{t+1} = x_t + h_t.

State (m_t, H_t, x_{t−1}, t) is kept in float64 under the string key ``"cubic"`` of
``self.state``: ``Optimizer.load_state_dict`` casts per-parameter state to the parameter dtype, but
leaves non-parameter keys alone, so a float32 model still resumes bit-exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ops.cubic_momentum import (
    check_coefficient,
    check_momentum_type,
    extrapolate,
    hessian_momentum,
    momentum_update,
)
from ops.cubic_subproblem import CubicStep, reg_newton_step, solve_cubic_exact, solve_cubic_hvp

STEP_TYPES = ("cubic", "reg_newton")
SOLVERS = ("exact", "hvp")
TRANSPORTS = ("momentum", "sample")
_KEY = "cubic"


class StochasticCubicNewton(torch.optim.Optimizer):
    """Stochastic cubic-regularized (or gradient-regularized) Newton with gradient and Hessian momentum.

    Args:
        params: parameters (all groups are flattened into one vector x).
        M: cubic regularization constant, M/6 convention (≈ Hessian Lipschitz constant L₂).
        grad_momentum: α ∈ (0, 1]; α = 1 disables gradient momentum.
        hess_momentum: β ∈ (0, 1]; β = 1 disables Hessian momentum. Ignored by the HVP solver, whose
            Hessian is the current sample (``hessian_window`` = 1).
        momentum_type: ``hessian_corrected`` (default, [derived]), ``ema``, ``extrapolated``
            (reconstructed choices) or ``none`` (plain stochastic cubic Newton, α = β = 1).
        transport_hessian: Hessian used by ``hessian_corrected`` to move m_{t−1} to x_t: ``momentum``
            (H_t, default) or ``sample`` (Ĥ_t, Tran & Cutkosky 2022 style).
        step_type: ``cubic`` (argmin of the cubic model) or ``reg_newton`` (−(H + √(M‖m‖) I)⁻¹ m, for
            convex problems; reconstructed).
        solver: ``exact`` (eigendecomposition, d ≤ ``max_dim_exact``) or ``hvp`` (gradient descent on
            the cubic model with Hessian-vector products).
        solver_kwargs: extra keyword arguments for the solver (e.g. ``rel_acc``, ``max_iters``).
        max_dim_exact: largest dimension for which the exact solver (d×d Hessian) is allowed.
        hessian_window: HVP-mode Hessian window; only 1 is implemented (β is then ignored).
        max_extrapolation_norm: clip ‖y_t − x_t‖ and ‖z_t − x_t‖ to this norm (``extrapolated`` only).
        seed: seed of the generator used by the HVP solver (perturbation, power iteration).
        momentum_decay: if set to p > 0, use the schedule α_t = max(grad_momentum, (t+1)^−p) and
            β_t = max(hess_momentum, (t+1)^−p) instead of constants ([derived], stretch experiment).
    """

    def __init__(
        self,
        params,
        M: float = 1.0,
        grad_momentum: float = 0.01,
        hess_momentum: float = 0.01,
        momentum_type: str = "hessian_corrected",
        transport_hessian: str = "momentum",
        step_type: str = "cubic",
        solver: str = "exact",
        solver_kwargs: dict[str, Any] | None = None,
        max_dim_exact: int = 2000,
        hessian_window: int = 1,
        max_extrapolation_norm: float | None = None,
        seed: int = 0,
        momentum_decay: float | None = None,
    ) -> None:
        if not M > 0:
            raise ValueError(f"StochasticCubicNewton: M must be > 0, got M={M}")
        check_coefficient("grad_momentum", grad_momentum)
        check_coefficient("hess_momentum", hess_momentum)
        check_momentum_type(momentum_type)
        for name, value, allowed in (
            ("transport_hessian", transport_hessian, TRANSPORTS),
            ("step_type", step_type, STEP_TYPES),
            ("solver", solver, SOLVERS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"StochasticCubicNewton: {name} must be one of {allowed}, got {value!r}"
                )
        if hessian_window != 1:
            raise ValueError(f"hessian_window={hessian_window}: only a window of 1 is implemented")
        if step_type == "reg_newton" and solver != "exact":
            raise ValueError("step_type='reg_newton' needs solver='exact' (a d×d Hessian)")
        defaults = dict(M=M)
        super().__init__(params, defaults)
        group_M = {g["M"] for g in self.param_groups}
        if len(group_M) > 1:  # one flat vector, one cubic model: a per-group M has no meaning
            raise ValueError(f"StochasticCubicNewton: all param groups must share M, got {group_M}")
        if solver == "hvp" and momentum_type == "hessian_corrected" and grad_momentum < 1:
            # hessian_window = 1 keeps no Hessian momentum: H_t = Ĥ_t, so both transports are the
            # sample's. On the saddle problem (spec §6B, α = β = 0.1) that transport diverges
            # (docs/cubic-newton-momentum.md), while H_t-transport in exact mode escapes.
            warnings.warn(
                "StochasticCubicNewton(solver='hvp', momentum_type='hessian_corrected'): the HVP "
                "solver keeps no Hessian momentum, so m is transported with the current sample "
                "Hessian (transport_hessian='sample' in effect); it can diverge where steps are "
                "long on a strongly curved objective (see docs/cubic-newton-momentum.md)",
                stacklevel=2,
            )
        if momentum_type == "none":
            grad_momentum = hess_momentum = 1.0
        self.alpha, self.beta = float(grad_momentum), float(hess_momentum)
        self.momentum_type, self.transport_hessian = momentum_type, transport_hessian
        self.step_type, self.solver = step_type, solver
        self.solver_kwargs = dict(solver_kwargs or {})
        self.max_extrapolation_norm = max_extrapolation_norm
        if momentum_decay is not None and not momentum_decay > 0:
            raise ValueError(f"momentum_decay must be > 0 or None, got {momentum_decay}")
        self.momentum_decay = momentum_decay
        self._generator = torch.Generator().manual_seed(seed)
        self.dim = sum(p.numel() for p in self._params())
        if solver == "exact" and self.dim > max_dim_exact:
            raise ValueError(
                f"solver='exact' needs a {self.dim}×{self.dim} Hessian but max_dim_exact="
                f"{max_dim_exact}; use solver='hvp' or raise max_dim_exact"
            )
        self.last: CubicStep | None = None  # diagnostics of the last step (not state)
        self.last_extrapolation_norm = 0.0

    # ---------------------------------------------------------------- flat-vector helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def flat_params(self) -> Tensor:
        """x_t as one float64 vector (a copy)."""
        return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self._params()])

    def _write(self, x: Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self._params():
                n = p.numel()
                p.copy_(x[offset : offset + n].view_as(p).to(p.dtype))
                offset += n

    @property
    def cubic_state(self) -> dict[str, Any]:
        return self.state[_KEY]  # type: ignore[index]

    def coefficients(self) -> tuple[float, float]:
        """(α_t, β_t) for the coming step."""
        if self.momentum_decay is None or self.momentum_type == "none":
            return self.alpha, self.beta
        decay = (int(self.cubic_state.get("step", 0)) + 1) ** (-self.momentum_decay)
        return max(self.alpha, decay), max(self.beta, decay)

    # ---------------------------------------------------------------- oracle points
    def evaluation_points(self) -> tuple[Tensor, Tensor]:
        """(y_t, z_t): where ĝ_t and Ĥ_t must be evaluated, as float64 flat vectors (spec §3, step 1)."""
        x = self.flat_params()
        st = self.cubic_state
        if self.momentum_type != "extrapolated" or "x_prev" not in st:
            self.last_extrapolation_norm = 0.0
            return x, x
        alpha, beta = self.coefficients()
        y = extrapolate(x, st["x_prev"], alpha)
        # The HVP solver averages no Hessians (β is ignored), so its one sample belongs at x_t, not
        # (1−β)/β steps ahead.
        z = x if self.solver == "hvp" else extrapolate(x, st["x_prev"], beta)
        self.last_extrapolation_norm = float(torch.linalg.vector_norm(y - x))
        if self.max_extrapolation_norm is not None:
            y, z = (self._clip(x, p) for p in (y, z))
        return y, z

    def _clip(self, x: Tensor, p: Tensor) -> Tensor:
        d = p - x
        n = float(torch.linalg.vector_norm(d))
        cap = float(self.max_extrapolation_norm)  # type: ignore[arg-type]
        return x + d * (cap / n) if n > cap else p

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad: Tensor,
        hess: Tensor | None = None,
        hvp: Callable[[Tensor], Tensor] | None = None,
        broadcast: Callable[[Tensor], Tensor] | None = None,
    ) -> Any:
        """One iteration x_{t+1} = x_t + h_t (spec §3, steps 4–7).

        Args:
            closure: optional; called first (Lightning passes one that runs ``on_before_optimizer_step``).
            grad: ĝ_t at y_t, flat (d,).
            hess: Ĥ_t at z_t, (d, d) — required by the exact solver.
            hvp: v ↦ Ĥ_t v at z_t — required by the HVP solver.
            broadcast: makes h_t identical on all ranks (e.g. broadcast from rank 0) under DDP.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad.shape != (self.dim,):
            raise ValueError(f"grad must have shape ({self.dim},), got {tuple(grad.shape)}")
        st = self.cubic_state
        M = self.param_groups[0]["M"]
        x = self.flat_params()
        x_prev = st.get("x_prev", x)
        dx = x - x_prev
        g = grad.detach().to(torch.float64)
        alpha, beta = self.coefficients()
        if self.solver == "exact":
            if hess is None:
                raise ValueError("solver='exact' needs hess=Ĥ_t")
            H_hat = hess.detach().to(torch.float64)
            H = hessian_momentum(st.get("H"), H_hat, beta)
            transport = H if self.transport_hessian == "momentum" else H_hat
            m = momentum_update(self.momentum_type, st.get("m"), g, alpha, H=transport, dx=dx)
            if self.step_type == "cubic":
                sol = solve_cubic_exact(m, H, M, **self.solver_kwargs)
            else:
                sol = reg_newton_step(m, H, M)
            st["H"] = H
        else:
            if hvp is None:
                raise ValueError("solver='hvp' needs hvp=(v ↦ Ĥ_t v)")

            def hvp64(v: Tensor) -> Tensor:
                return hvp(v).detach().to(torch.float64)

            m = momentum_update(self.momentum_type, st.get("m"), g, alpha, H=hvp64, dx=dx)
            sol = solve_cubic_hvp(m, hvp64, M, generator=self._generator, **self.solver_kwargs)
        h = sol.h.to(torch.float64)
        if broadcast is not None:
            h = broadcast(h)
        st["m"], st["x_prev"] = m, x
        st["step"] = int(st.get("step", 0)) + 1
        self._write(x + h)
        self.last = sol._replace(h=h)
        return loss

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["hvp_generator"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("hvp_generator", None)
        super().load_state_dict(state_dict)
        if gen_state is not None:
            self._generator.set_state(gen_state)
