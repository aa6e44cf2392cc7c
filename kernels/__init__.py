"""Triton kernels for the sparse adapter core (installed as ``lightning_peft.kernels``).

Each op has a pure-PyTorch reference (CPU path, test oracle and benchmark baseline), a Triton
kernel with its host launcher, and a ``torch.autograd.Function``. The ops land with the
sparse-core issue; this package exists now so the install layout is fixed from the start.
"""
