"""Triton kernels: the same ``@triton.jit`` source runs compiled on a GPU and in the CPU interpreter."""
