"""Nyström self-attention (Xiong et al., AAAI 2021), the attention layer of TransMIL.

A re-implementation of the ``NystromAttention`` module of lucidrains' ``nystrom-attention`` package
(the one TransMIL imports), without a dependency on it and without einops:

- the sequence is zero-padded *at the front* to a multiple of ``num_landmarks`` (no mask, as
  TransMIL calls it);
- landmarks are the means of ``l = ceil(n / m)`` consecutive queries / keys;
- ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with the Moore-Penrose pseudo-inverse
  approximated by ``pinv_iterations`` iterations of Razavi et al.'s scheme;
- an extra depth-wise convolution residual of the values (kernel ``residual_conv_kernel`` along the
  sequence), then the output projection with dropout; the front padding is cut off again.

This module holds no model: the registry imports it like the model modules, and it registers nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def moore_penrose_iter_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Iterative Moore-Penrose pseudo-inverse of the last two dimensions of ``x``.

    Initialised with ``x^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|)`` (maxima over the whole
    tensor, as in nystrom-attention, but per element of the leading batch dimension, so that a batch
    of bags gives each bag its result alone; the same for a batch of one), then
    ``Z <- Z (13 I - XZ (15 I - XZ (7 I - XZ))) / 4``.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    if x.ndim > 2:
        scale = col.flatten(1).amax(1) * row.flatten(1).amax(1)
        z = x.transpose(-1, -2) / scale.reshape(-1, *([1] * (x.ndim - 1)))
    else:
        z = x.transpose(-1, -2) / (col.max() * row.max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention over ``x (B, n, dim)``.

    ``forward(x, attn_of=i)`` also returns the (approximate) attention row of query ``i`` (an index
    into the unpadded sequence) over the ``n`` unpadded tokens, ``(B, heads, n)``; with
    ``exact=True`` that row is the exact ``softmax(q_i K^T)`` over the unpadded tokens instead of
    the Nyström approximation (which can hold small negative entries).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.num_landmarks = int(num_landmarks)
        self.pinv_iterations = int(pinv_iterations)
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual:
            pad = residual_conv_kernel // 2
            self.res_conv = nn.Conv2d(heads, heads, (residual_conv_kernel, 1), padding=(pad, 0), groups=heads,
                                      bias=False)

    def forward(self, x: Tensor, attn_of: int | None = None, exact: bool = False) -> tuple[Tensor, Tensor | None]:
        b, n, _ = x.shape
        m = self.num_landmarks
        padding = (m - n % m) % m
        if padding:
            x = F.pad(x, (0, 0, padding, 0), value=0.0)  # at the front, as nystrom-attention
        n_pad = n + padding
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n_pad, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # b h n d
        q = q * self.scale
        l = math.ceil(n_pad / m)  # noqa: E741 - tokens per landmark
        q_land = q.reshape(b, self.heads, n_pad // l, l, self.dim_head).mean(dim=3)
        k_land = k.reshape(b, self.heads, n_pad // l, l, self.dim_head).mean(dim=3)
        attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # b h n m
        attn2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # b h m m
        attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # b h m n
        attn2_inv = moore_penrose_iter_pinv(attn2, self.pinv_iterations)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, n_pad, self.heads * self.dim_head)
        out = self.to_out(out)[:, -n:]
        row = None
        if attn_of is not None:
            i = padding + (attn_of % n)
            if exact:
                row = torch.softmax(q[:, :, i:i + 1] @ k[:, :, padding:].transpose(-1, -2), dim=-1)[:, :, 0]
            else:
                row = ((attn1[:, :, i:i + 1] @ attn2_inv) @ attn3)[:, :, 0, padding:]
        return out, row
