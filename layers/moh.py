"""Mixture-of-head attention (Jin et al., 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention",
arXiv:2410.11842) as an output gate of any per-head attention mixer.

Multi-head attention ``sum_i H^i W_O^i`` becomes ``sum_i g_i H^i W_O^i``: each token weights its head outputs
``H^i`` with router scores ``g_i`` before the output projection. With ``h`` heads of which the first ``h_s`` are
shared (always active) and the other ``h_r = h - h_s`` are routed (``k`` of them active per token):

* routed: ``p = softmax(x W_r)`` over the ``h_r`` routed heads; the top-``k`` keep ``k p_i / sum_top-k p`` (the
  rest 0);
* shared: ``h_s softmax(x W_s)`` (``h_s > 1``) or 1 (``h_s = 1``);
* with both kinds, ``[a_s, a_r] = 2 softmax(x W_h)`` scales the shared and the routed weights.

A uniform router therefore weights every active head by exactly 1 (with ``k = h_r``: plain multi-head attention).
The load-balance loss of the routed heads, ``h_r sum_i f_i P_i`` (``f_i``: fraction of the tokens that activate head
``i``, ``P_i``: its mean router probability), is kept by every gate after a training forward
(:attr:`MoHGate.balance_loss`); :func:`moh_balance_loss` averages it over a model's gates (the paper adds it to the
task loss with weight 0.01). This scaling and normalisation follow the official code (``SkyworkAI/MoH``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MoHGate", "check_moh_args", "moh_balance_loss"]


def check_moh_args(num_heads: int, topk: int | None, shared_heads: int) -> None:
    """ValueError naming ``moh_topk`` / ``moh_shared_heads`` when they do not fit ``num_heads`` heads."""
    if not 0 <= shared_heads < num_heads:
        raise ValueError(
            f"moh_shared_heads must be in [0, num_heads) = [0, {num_heads}) (at least one routed head), got "
            f"{shared_heads}"
        )
    routed = num_heads - shared_heads
    if topk is None or not 1 <= topk <= routed:
        raise ValueError(
            f"gate='moh' needs moh_topk in [1, num_heads - moh_shared_heads] = [1, {routed}] (routed heads active per "
            f"token; {num_heads} heads, {shared_heads} shared), got {topk}"
        )


class MoHGate(nn.Module):
    """Mixture-of-head routing on a per-head output ``y`` ``(..., heads * head_dim)`` from the mixer input ``x``
    ``(..., dim)``: ``forward(x, y)`` returns ``y`` with head ``i`` scaled by ``g_i(x)``.

    Args:
        dim: width of the router input ``x``.
        num_heads: heads of the gated output; the first ``shared_heads`` are shared, the rest routed.
        head_dim: channels per head of the gated output.
        topk: routed heads active per token (``1 .. num_heads - shared_heads``).
        shared_heads: always-active heads (``0 .. num_heads - 1``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        topk: int | None,
        shared_heads: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_moh_args(num_heads, topk, shared_heads)
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.topk = int(topk)  # an int in [1, routed heads] (checked)
        self.shared_heads = shared_heads
        self.routed_heads = num_heads - shared_heads
        self.routed = nn.Linear(dim, self.routed_heads, bias=False, **dd)  # W_r
        self.shared = nn.Linear(dim, shared_heads, bias=False, **dd) if shared_heads > 1 else None  # W_s
        self.split = nn.Linear(dim, 2, bias=False, **dd) if shared_heads > 0 else None  # W_h
        self.balance_loss = torch.zeros((), **dd)  # of the last training forward

    def head_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router weights ``(..., heads)`` (shared heads first) for ``x`` ``(..., dim)``, with the routed heads'
        probabilities and their top-k mask ``(..., routed_heads)``."""
        probs = self.routed(x).float().softmax(dim=-1)
        top = probs.topk(self.topk, dim=-1).indices
        mask = torch.zeros_like(probs).scatter_(-1, top, 1.0)
        kept = probs * mask
        routed = kept * (self.topk / kept.sum(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.split is None:
            return routed, probs, mask
        shares = self.split(x).float().softmax(dim=-1) * 2.0
        if self.shared is None:  # one shared head: weight 1 before the split
            shared = torch.ones_like(routed[..., : self.shared_heads])
        else:
            shared = self.shared(x).float().softmax(dim=-1) * float(self.shared_heads)
        weights = torch.cat([shared * shares[..., :1], routed * shares[..., 1:]], dim=-1)
        return weights, probs, mask

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` ``(..., heads * head_dim)`` weighted per head by the router of ``x`` ``(..., dim)``."""
        weights, probs, mask = self.head_weights(x)
        if self.training:
            mean_probs = probs.flatten(0, -2).mean(dim=0)
            load = mask.flatten(0, -2).mean(dim=0)
            self.balance_loss = (mean_probs * load).sum() * self.routed_heads
        heads = y.reshape(list(y.shape[:-1]) + [self.num_heads, self.head_dim])
        return (heads * weights.to(y.dtype).unsqueeze(-1)).flatten(-2)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, topk={self.topk}, shared_heads={self.shared_heads}"


def moh_balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balance loss of the :class:`MoHGate` modules of ``model`` in training mode, from their last forward
    (``None`` when it has none)."""
    losses = [m.balance_loss for m in model.modules() if isinstance(m, MoHGate) and m.training]
    return torch.stack(losses).mean() if losses else None
