"""Structured initialisation of a ViT trained from scratch (``--position_init``, ``--attention_init``).

A ViT starts with random position embeddings and attention that looks everywhere at once; on a few thousand
tiles it has to learn locality from the data. Two initialisations give it a convolution's prior instead and
leave the architecture as it is (the saved model is a plain ``ViTForImageClassification``):

- ``sincos``: the fixed 2-D sine-cosine position embeddings of MAE (He et al. 2022) as the starting point of the
  learnt ones;
- ``impulse``: every head's attention starts as an impulse filter, each patch attending to one neighbour at a
  fixed offset in a ``kernel`` x ``kernel`` window (a different offset per head of a layer), as a convolution
  is a sum of shifted impulses (Zheng, Li and Lucey 2024, "Structured initialization for attention in vision
  transformers"). The patches' position embeddings become orthogonal (zero-mean) rows, and the query/key weights
  are solved so that on them the attention logits are those impulses: ``q_i . k_j = strength`` for the chosen
  neighbour ``j`` of ``i``, 0 otherwise. An impulse needs position embeddings of full rank: MAE's sin-cos ones on
  a small grid have a rank of about 13 for 49 patches, so the two are not combined.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

POSITION_INITS = ("random", "sincos")
ATTENTION_INITS = ("random", "impulse")
IMPULSE_STRENGTH = 4.0  # attention logit of the chosen neighbour: softmax gives it ~half the weight of 50 tokens
IMPULSE_KERNEL = 3


def check_init(position: str, attention: str, from_scratch: bool) -> None:
    """ValueError unless the names are known and (for anything but ``random``) the model is trained from scratch."""
    if position not in POSITION_INITS:
        raise ValueError(f"--position_init {position!r}: give one of {', '.join(POSITION_INITS)}")
    if attention not in ATTENTION_INITS:
        raise ValueError(f"--attention_init {attention!r}: give one of {', '.join(ATTENTION_INITS)}")
    if position == "sincos" and attention == "impulse":
        raise ValueError("--attention_init impulse sets its own (orthogonal) position embeddings: leave "
                         "--position_init at random")
    if (position, attention) != ("random", "random") and not from_scratch:
        raise ValueError("--position_init/--attention_init initialise a model trained --from_scratch; a checkpoint "
                         "brings its own weights (leave them at random)")


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2-D sine-cosine embeddings (MAE's): half the channels encode the row, half the column,
    each as sin and cos of the position at ``dim / 4`` frequencies from 1 to 1/10000. Row-major patch order."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angle = axis[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def impulse_offsets(layers: int, heads: int, kernel: int, generator: torch.Generator) -> list[list[tuple[int, int]]]:
    """Per layer, one (row, column) offset per head from the ``kernel`` x ``kernel`` window, distinct within a layer
    while the window has enough offsets (the centre first: every layer keeps a head on the patch itself)."""
    half = kernel // 2
    window = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1) if (dy, dx) != (0, 0)]
    chosen = []
    for _ in range(layers):
        order = [window[i] for i in torch.randperm(len(window), generator=generator).tolist()]
        offsets = [(0, 0), *order]
        chosen.append([offsets[h % len(offsets)] for h in range(heads)])
    return chosen


def impulse_logits(grid: int, offset: tuple[int, int], strength: float) -> torch.Tensor:
    """[N, N] target attention logits over the N = grid * grid patches: ``strength`` where patch j is patch i moved
    by ``offset`` (inside the grid), 0 elsewhere."""
    target = torch.zeros(grid * grid, grid * grid, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            r, c = row + offset[0], col + offset[1]
            if 0 <= r < grid and 0 <= c < grid:
                target[row * grid + col, r * grid + c] = strength
    return target


def orthogonal_positions(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[count, dim] orthogonal rows with zero mean and unit mean square (what a LayerNorm leaves as they are)."""
    if count >= dim:
        raise ValueError(f"impulse attention needs more channels ({dim}) than patches ({count})")
    basis = torch.randn(dim, count + 1, generator=generator, dtype=torch.float64)
    basis[:, 0] = 1.0  # the constant direction first: the other columns come out orthogonal to it (zero mean)
    q, _ = torch.linalg.qr(basis)
    return q[:, 1:].T * math.sqrt(dim)


def _query_key_for(positions: torch.Tensor, target: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key weights [head_dim, D] of one head whose scaled logits on ``positions`` [N, D] are ``target``:
    M = P+ T (P+)^T solved by least squares, then split into two factors of rank ``head_dim`` by SVD."""
    pinv = torch.linalg.pinv(positions)
    bilinear = pinv @ target @ pinv.T * math.sqrt(head_dim)  # the model divides the logits by sqrt(head_dim)
    u, s, vh = torch.linalg.svd(bilinear)
    root = s[:head_dim].sqrt()
    return (u[:, :head_dim] * root).T, (vh[:head_dim].T * root).T


@torch.no_grad()
def apply_structured_init(model: Any, position: str = "random", attention: str = "random", seed: int = 0) -> None:
    """Initialise ``model`` (a from-scratch ViT) in place: ``position`` in :data:`POSITION_INITS`, ``attention`` in
    :data:`ATTENTION_INITS` (``impulse`` is solved on the position embeddings the model has after ``position``)."""
    if position == "random" and attention == "random":
        return
    config = model.config
    vit = model.vit
    grid = config.image_size // config.patch_size
    table = vit.embeddings.position_embeddings  # [1, 1 + N, D]: the CLS position first
    if position == "sincos":
        table[0, 1:].copy_(sincos_position_embeddings(grid, config.hidden_size))
        logger.info("position embeddings initialised as 2-D sin-cos (%dx%d grid)", grid, grid)
    if attention == "impulse":
        generator = torch.Generator().manual_seed(seed)
        positions = orthogonal_positions(grid * grid, config.hidden_size, generator)
        table[0, 1:].copy_(positions)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        offsets = impulse_offsets(len(vit.layers), heads, IMPULSE_KERNEL, generator)
        for layer, layer_offsets in zip(vit.layers, offsets):
            block = layer.attention
            for head, offset in enumerate(layer_offsets):
                query, key = _query_key_for(positions, impulse_logits(grid, offset, IMPULSE_STRENGTH), head_dim)
                rows = slice(head * head_dim, (head + 1) * head_dim)
                block.q_proj.weight[rows] = query.to(block.q_proj.weight.dtype)
                block.k_proj.weight[rows] = key.to(block.k_proj.weight.dtype)
            block.q_proj.bias.zero_()
            block.k_proj.bias.zero_()
        logger.info("attention initialised as %dx%d impulse filters (%d layers x %d heads)", IMPULSE_KERNEL,
                    IMPULSE_KERNEL, len(vit.layers), heads)
