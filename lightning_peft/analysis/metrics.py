"""Pure drift metrics between two versions of a base model (Trans-PEFT, arXiv 2506.06844, sec. 2).

All functions are side-effect free and work on CPU tensors; shapes are in the docstrings.
"""

from __future__ import annotations

import re

import torch

_EPS = 1e-12

# module-name suffix -> (module type, group); GPT-2's `attn.c_proj` vs `mlp.c_proj` by parent
_TYPES: tuple[tuple[str, str, str], ...] = (
    (r"q_proj", "q", "attention"), (r"k_proj", "k", "attention"), (r"v_proj", "v", "attention"),
    (r"o_proj|out_proj|attn\.c_proj|dense", "o", "attention"), (r"c_attn|qkv_proj|query_key_value", "qkv", "attention"),
    (r"gate_proj", "gate", "ffn"), (r"up_proj|c_fc|fc1", "up", "ffn"), (r"down_proj|mlp\.c_proj|fc2", "down", "ffn"),
    (r"embed_tokens|wte|wpe|embed_positions", "embedding", "embedding"),
    (r"[a-z_]*norm|ln_\d|ln_f", "norm", "norm"), (r"lm_head", "head", "head"),
)


def module_type(param_name: str) -> tuple[str, str]:
    """(type, group) of a parameter name, e.g. ``model.layers.0.mlp.down_proj.weight`` -> ("down", "ffn")."""
    stem = param_name.rsplit(".", 1)[0]
    for pattern, kind, group in _TYPES:
        if re.search(rf"(^|\.)({pattern})$", stem):
            return kind, group
    return "other", "other"


def layer_index(param_name: str) -> int | None:
    """Decoder-layer index in a parameter name (``layers.3.`` / ``h.3.`` -> 3), ``None`` outside layers."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", "." + param_name)
    return int(match.group(1)) if match else None


def relative_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """||W_n - W_o||_F / ||W_o||_F (0 for identical tensors)."""
    old, new = old.detach().double(), new.detach().double()
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(_EPS))


def cosine(old: torch.Tensor, new: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened to vectors (1 for identical tensors)."""
    a, b = old.detach().double().flatten(), new.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(_EPS))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019, eq. 5) of two representations of the same n inputs.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) after centering the columns; invariant to
    orthogonal transforms and isotropic scaling; 1 for identical representations.

    Args:
        x: (n, d1) representations.
        y: (n, d2) representations of the same n examples.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    x = x.detach().double() - x.detach().double().mean(0, keepdim=True)  # (n, d1)
    y = y.detach().double() - y.detach().double().mean(0, keepdim=True)  # (n, d2)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)).clamp_min(_EPS))


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between distributions along ``dim``.

    Args:
        p: (..., K) probabilities (rows sum to 1; zeros allowed, e.g. causal masking).
        q: Same shape as ``p``.

    Returns:
        (...) divergences; 0 where ``p == q``.
    """
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(_EPS)) - torch.log(m.clamp_min(_EPS))), 0.0).sum(dim)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0.0)


def topk_overlap(old: torch.Tensor, new: torch.Tensor, k: int) -> float:
    """|top-k(old) ∩ top-k(new)| / k for two per-neuron scores of shape (d_ff,) (1 when equal)."""
    if not 1 <= k <= old.numel():
        raise ValueError(f"topk_overlap needs 1 <= k <= {old.numel()} neurons, got k={k}")
    a = set(torch.topk(old.double(), k).indices.tolist())
    b = set(torch.topk(new.double(), k).indices.tolist())
    return len(a & b) / k
