"""Layer 1, the math: noise schedule, UNet, losses, EMA, per-seed noise. Imports only ``errors``."""
