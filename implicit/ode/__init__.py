"""Neural ODEs and SDEs with trajectories solved sequentially or in parallel in time."""

from .models import NeuralODE, NeuralSDE
from .solve import (
    brownian_increments,
    check_finite,
    odeint_parallel,
    odeint_sequential,
    sdeint_parallel,
    sdeint_sequential,
)
from .steppers import SDE_STEPPERS, STEPPERS

__all__ = [
    "NeuralODE", "NeuralSDE", "SDE_STEPPERS", "STEPPERS", "brownian_increments", "check_finite", "odeint_parallel",
    "odeint_sequential", "sdeint_parallel", "sdeint_sequential",
]
