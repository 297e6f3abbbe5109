"""Layer 3: ``s2dm fid`` and ``s2dm eval``: Fréchet statistics, their inputs, the Inception network."""
