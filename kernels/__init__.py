"""fanout's Triton kernels, each beside a plain-torch `reference_*` twin with the same signature."""
