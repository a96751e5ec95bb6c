"""The training loop and its CPU kernels."""
