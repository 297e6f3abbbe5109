"""Layer 2: configs, checkpoints and data sets. Imports ``core``, ``util`` and ``errors``."""
