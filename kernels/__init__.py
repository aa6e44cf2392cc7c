"""Triton kernels for the sparse adapter core (installed as ``lightning_peft.kernels``).

Each op has a pure-PyTorch reference (CPU path, test oracle and benchmark baseline), a Triton
kernel with its host launcher, and a ``torch.autograd.Function`` where it has a gradient:

=====================  ============================  =====================================
op                     module                        reference
=====================  ============================  =====================================
sparse index format    :mod:`.sparse_index`          (``SparseIndex``: sorted COO, int32)
SDDMM ``dS``           :mod:`.sddmm`                 ``sddmm_reference`` (CPU: ``sampled_addmm``)
scatter set/add/undo   :mod:`.scatter`               ``scatter_*_reference``
sparse-delta linear    :mod:`.sparse_linear`         ``sparse_delta_linear_reference``
=====================  ============================  =====================================

Dispatch (every op's ``use_triton`` argument): ``None`` runs Triton on CUDA tensors and the
reference elsewhere; ``True`` forces Triton, which on CPU needs ``TRITON_INTERPRET=1`` set
before this package is first imported; ``False`` forces the PyTorch path (the reference; for
SDDMM ``torch.sparse.sampled_addmm``, see :func:`.sddmm.sddmm_sampled_addmm`).
"""

# This folder sits at the repository root. When the root is on ``sys.path`` (``python -m pytest``,
# a REPL started there) it is also findable as a top-level ``kernels``, which transformers probes
# for Hugging Face's ``kernels`` package and imports. Re-exporting from that name would import
# lightning_peft (and so transformers) in the middle of transformers' own import: a circular
# import. So the re-exports run only under the installed name ``lightning_peft.kernels``.
if __name__ == "lightning_peft.kernels":
    from lightning_peft.kernels.scatter import (
        scatter_add,
        scatter_add_reference,
        scatter_restore,
        scatter_restore_reference,
        scatter_set,
        scatter_set_reference,
    )
    from lightning_peft.kernels.sddmm import sddmm, sddmm_reference, sddmm_sampled_addmm
    from lightning_peft.kernels.sparse_index import SparseIndex
    from lightning_peft.kernels.sparse_linear import (
        merged_weight,
        sparse_delta_linear,
        sparse_delta_linear_reference,
    )

    __all__ = [
        "SparseIndex",
        "merged_weight",
        "scatter_add",
        "scatter_add_reference",
        "scatter_restore",
        "scatter_restore_reference",
        "scatter_set",
        "scatter_set_reference",
        "sddmm",
        "sddmm_reference",
        "sddmm_sampled_addmm",
        "sparse_delta_linear",
        "sparse_delta_linear_reference",
    ]
