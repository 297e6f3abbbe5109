"""Layer 3: ``s2dm convert`` and ``s2dm export``: the diffusers / DDIM-repository weight layouts."""
