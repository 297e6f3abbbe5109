"""Layer 3: ``s2dm sample``, per-seed images from a checkpoint into a folder."""
