"""GET: one-step generators distilled from a diffusion teacher (Geng et al., arXiv 2401.08639)."""
