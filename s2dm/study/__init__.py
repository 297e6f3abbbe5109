"""Layer 4: ``s2dm study``, paired training-and-evaluation studies and their report."""
