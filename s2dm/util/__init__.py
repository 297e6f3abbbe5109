"""Layer 1, the plumbing: atomic files, images, processes and devices, number formatting, plots.
Imports only ``errors``."""
