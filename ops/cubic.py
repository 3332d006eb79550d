"""Stochastic cubic Newton with momentum: the Lightning-free math in one import.

The implementation is split by concept: :mod:`ops.cubic_subproblem` (the M/6-convention cubic model and
its exact / HVP solvers, the gradient-regularized Newton step) and :mod:`ops.cubic_momentum` (gradient
and Hessian momentum estimators).
"""

from ops.cubic_momentum import (
    MOMENTUM_TYPES,
    extrapolate,
    hessian_momentum,
    momentum_update,
)
from ops.cubic_subproblem import (
    CubicStep,
    cubic_model,
    cubic_model_grad,
    from_m3_convention,
    reg_newton_step,
    solve_cubic_exact,
    solve_cubic_hvp,
)

__all__ = [
    "MOMENTUM_TYPES",
    "CubicStep",
    "cubic_model",
    "cubic_model_grad",
    "extrapolate",
    "from_m3_convention",
    "hessian_momentum",
    "momentum_update",
    "reg_newton_step",
    "solve_cubic_exact",
    "solve_cubic_hvp",
]
