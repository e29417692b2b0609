"""DEQ-DDIM: DDIM sampling and inversion through one fixed point (arXiv 2210.12867).

Samplers take any ``eps(x, t)`` and a :class:`DDIMSchedule`; a diffusers ``UNet2DModel``
with a ``DDIMScheduler`` comes in through :class:`UNetEps` / :func:`load_local`.
"""

from .adapter import UNetEps as UNetEps, load_local as load_local
from .inversion import InversionResult as InversionResult, ddim_invert as ddim_invert, invert as invert
from .sampling import SAMPLERS as SAMPLERS, DDIMStep as DDIMStep, ddim as ddim, deq_ddim as deq_ddim
from .sampling import disable_tf32 as disable_tf32, make_noise as make_noise, noise_tol_scale as noise_tol_scale
from .schedule import DDIMSchedule as DDIMSchedule

__all__ = ["DDIMSchedule", "DDIMStep", "InversionResult", "SAMPLERS", "UNetEps", "ddim", "ddim_invert", "deq_ddim",
           "disable_tf32", "invert", "load_local", "make_noise", "noise_tol_scale"]
