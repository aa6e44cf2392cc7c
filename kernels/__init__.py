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
tile add/undo, x S^T   :mod:`.tiles`                 PyTorch row ops (CPU: C loops)
tile-delta linear      :mod:`.tile_linear`           ``tile_delta_linear_reference``
tile ``dS``            :mod:`.tile_linear`           ``tile_sddmm_reference`` (the CPU path)
=====================  ============================  =====================================

Dispatch (every op's ``use_triton`` argument): ``None`` runs Triton on CUDA tensors and the
reference elsewhere; ``True`` forces Triton, which on CPU needs ``TRITON_INTERPRET=1`` set
before this package is first imported; ``False`` forces the PyTorch path (the reference; for
SDDMM ``torch.sparse.sampled_addmm``, see :func:`.sddmm.sddmm_sampled_addmm`).
"""

# This folder sits at the repository root. When the root is on ``sys.path`` (``python -m pytest``,
# ``python -m lightning_peft.cli``, a REPL started there) it is also findable as a top-level
# ``kernels``: the name of Hugging Face's package, which transformers (>= 5.25: at import) loads.
# Imported under that name, this folder hands over to the real package when it is installed (the
# import system returns what ``sys.modules`` holds once this file has run), and exports nothing else.
if __name__ != "lightning_peft.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
else:
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
    from lightning_peft.kernels.tile_linear import (
        tile_delta_linear,
        tile_delta_linear_reference,
        tile_sddmm,
        tile_sddmm_reference,
    )
    from lightning_peft.kernels.tiles import (
        TILE_WIDTHS,
        expand_tiles,
        find_tiles,
        switch_bytes,
        tile_add,
        tile_linear_add,
        tile_restore,
        tile_span,
    )

    __all__ = [
        "TILE_WIDTHS",
        "SparseIndex",
        "expand_tiles",
        "find_tiles",
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
        "switch_bytes",
        "tile_add",
        "tile_delta_linear",
        "tile_delta_linear_reference",
        "tile_linear_add",
        "tile_restore",
        "tile_sddmm",
        "tile_sddmm_reference",
        "tile_span",
    ]
