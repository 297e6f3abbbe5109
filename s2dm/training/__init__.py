"""Layer 3: ``s2dm train``, the training loop and its parts (per-step draws, run log, precision)."""
