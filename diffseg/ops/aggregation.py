"""Aggregation of self-attention maps over resolutions (docs/diffseg.md section 4): step 1 of
DiffSeg, shared with the K-Means baselines.

:func:`aggregate_attention` turns the per-resolution attention ``{64: (B,4096,4096), 32: ...}``
into one tensor ``(B, 4096, 64, 64)``: one key map of 64x64 per query position, each summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Features

__all__ = [
    "WeightsArg",
    "aggregate_attention",
    "attention_of",
    "resolution_weights",
    "validate_maps",
    "weights_json",
]

WeightsArg = str | Sequence[float] | Mapping[int, float]


# --------------------------------------------------------------------------------------------
# Aggregation (docs/diffseg.md section 4)
# --------------------------------------------------------------------------------------------


def resolution_weights(
    resolutions: Sequence[int], weights: WeightsArg = "proportional"
) -> dict[int, float]:
    """Aggregation weight of every resolution, normalised to sum to 1.

    Args:
        resolutions: token-grid sides used, e.g. ``[64, 32, 16, 8]``.
        weights: ``"proportional"`` (weight ``r``: the release's ``[64, 32, 16, 8] / 120``),
            ``"uniform"``, a sequence aligned with ``resolutions``, or a dict ``{r: weight}``.
            Weights must be finite and ``>= 0`` with a positive sum; a weight of 0 drops that
            resolution.

    Returns:
        ``{r: w_r}`` with ``sum(w_r) == 1``, in the order of ``resolutions``.
    """
    res = [int(r) for r in resolutions]
    if not res:
        raise ValueError("resolution_weights needs at least one resolution")
    if isinstance(weights, str):
        if weights == "proportional":
            raw = [float(r) for r in res]
        elif weights in ("uniform", "equal"):
            raw = [1.0] * len(res)
        else:
            raise ValueError(
                f"weights={weights!r} is not understood: use 'proportional', 'uniform', a list "
                f"aligned with resolutions {res}, or a dict {{resolution: weight}}"
            )
    elif isinstance(weights, Mapping):
        w = {int(k): float(v) for k, v in weights.items()}
        missing = [r for r in res if r not in w]
        if missing:
            raise ValueError(
                f"weights dict {w} has no entry for resolution(s) {missing} (used: {res})"
            )
        raw = [w[r] for r in res]
    else:
        raw = [float(v) for v in weights]
        if len(raw) != len(res):
            raise ValueError(
                f"got {len(raw)} weights {raw} for {len(res)} resolutions {res}; give one weight "
                "per resolution, in the same order"
            )
    if any(not math.isfinite(v) or v < 0 for v in raw) or sum(raw) <= 0:
        raise ValueError(
            f"aggregation weights must be finite, >= 0 and not all 0; got {raw} for {res}"
        )
    total = sum(raw)
    return {r: v / total for r, v in zip(res, raw, strict=True)}


def validate_maps(
    maps: Mapping[int, Tensor],
    resolutions: Sequence[int] | None = None,
    out_res: int = 64,
    check_values: bool = True,
) -> tuple[int, list[int]]:
    """Check an attention dict and return ``(batch_size, resolutions_used)``.

    ``maps[r]`` must be a floating tensor ``(B, r*r, r*r)`` (query, key), finite and ``>= 0``, with
    the same ``B`` and device for every ``r``, and ``out_res % r == 0``. ``resolutions=None`` uses
    every key of ``maps`` (largest first). Raises ``ValueError`` naming the offending key.
    ``check_values=False`` skips the value checks, the only ones that wait for the device.
    """
    if not isinstance(maps, Mapping) or len(maps) == 0:
        raise ValueError(
            "maps must be a non-empty dict {resolution: (B, r*r, r*r) tensor}, e.g. the output of "
            f"StableDiffusionBackbone.attention_maps; got {type(maps).__name__}"
        )
    res = (
        sorted((int(r) for r in maps), reverse=True)
        if resolutions is None
        else [int(r) for r in resolutions]
    )
    if not res:
        raise ValueError(
            "resolutions is empty: name at least one attention resolution to aggregate"
        )
    batch = None
    device = None
    for r in res:
        if r not in maps:
            raise ValueError(f"maps has no resolution {r}; it holds {sorted(maps)}")
        m = maps[r]
        if not isinstance(m, Tensor):
            raise ValueError(f"maps[{r}] must be a torch.Tensor, got {type(m).__name__}")
        if m.ndim != 3 or m.shape[1] != r * r or m.shape[2] != r * r:
            hint = " (add a batch axis with .unsqueeze(0))" if m.ndim == 2 else ""
            raise ValueError(
                f"maps[{r}] must have shape (B, {r * r}, {r * r}) = (batch, query, key) for a "
                f"{r}x{r} token grid; got {tuple(m.shape)}{hint}"
            )
        if not m.is_floating_point():
            raise ValueError(
                f"maps[{r}] must be floating point (attention probabilities), got {m.dtype}"
            )
        if r < 1 or r > out_res or out_res % r != 0:
            raise ValueError(
                f"resolution {r} does not divide the output grid {out_res} (maps[{r}])"
            )
        if m.shape[0] == 0:
            raise ValueError(f"maps[{r}] has an empty batch")
        if batch is None:
            batch, device = m.shape[0], m.device
        elif m.shape[0] != batch:
            raise ValueError(
                f"maps[{r}] has batch size {m.shape[0]} but maps[{res[0]}] has {batch}"
            )
        elif m.device != device:
            raise ValueError(f"maps[{r}] is on {m.device} but maps[{res[0]}] is on {device}")
        if not check_values:
            continue
        lo, hi = torch.aminmax(m)
        if not (bool(lo >= 0) and bool(torch.isfinite(hi))):
            n_neg = int((m < 0).sum())
            n_bad = int((~torch.isfinite(m)).sum())
            raise ValueError(
                f"maps[{r}] must hold attention probabilities (finite, >= 0): found {n_neg} negative "
                f"and {n_bad} non-finite entries (min {float(lo):.3g}). Pass softmax outputs, not "
                "logits."
            )
    assert batch is not None
    return batch, res


def aggregate_attention(
    maps: Mapping[int, Tensor],
    weights: WeightsArg = "proportional",
    resolutions: Sequence[int] | None = None,
    out_res: int = 64,
) -> Tensor:
    """Aggregate multi-resolution self-attention into ``out_res**2`` maps of ``out_res x out_res``.

    For each resolution ``r`` (docs/diffseg.md section 4): every key map ``(r, r)`` is upsampled
    bilinearly to ``(out_res, out_res)`` (half-pixel centres, no antialias, as Keras
    ``UpSampling2D``) and renormalised to sum to 1; the query grid is tiled by nearest repetition
    (query ``(y, x)`` of the output grid takes query ``(y // s, x // s)`` of ``r``,
    ``s = out_res // r``); the results are summed with :func:`resolution_weights`.

    Args:
        maps: ``{r: (B, r*r, r*r)}`` attention probabilities (rows are queries, columns keys), e.g.
            ``{64: (B,4096,4096), 32: (B,1024,1024), 16: (B,256,256), 8: (B,64,64)}``.
        weights: see :func:`resolution_weights`; renormalised over the resolutions used.
        resolutions: which keys of ``maps`` to use; all when None.
        out_res: side of the output grid (64 for SD v1 at 512x512).

    Returns:
        float32 ``(B, out_res**2, out_res, out_res)`` on the device of ``maps``: row
        ``q = y * out_res + x`` is the key map of query ``(y, x)``; each map sums to 1.
    """
    batch, res = validate_maps(maps, resolutions, out_res)
    return _aggregate(maps, batch, resolution_weights(res, weights), out_res)


def weights_json(weights: WeightsArg) -> str | list[float] | dict[str, float]:
    """The aggregation ``weights`` argument as JSON-able data (for ``describe()`` and results)."""
    if isinstance(weights, str):
        return weights
    if isinstance(weights, Mapping):
        return {str(k): float(v) for k, v in weights.items()}
    return [float(v) for v in weights]


def _aggregate(
    maps: Mapping[int, Tensor],
    batch: int,
    w: dict[int, float],
    out_res: int,
    check_values: bool = True,
) -> Tensor:
    """:func:`aggregate_attention` on validated maps, with normalised weights ``{r: w_r}``
    (``check_values=False``: no check for all-zero key maps, which waits for the device)."""
    res = list(w)
    n = out_res * out_res

    def scaled_keys(r: int) -> tuple[Tensor, Tensor]:
        """Upsampled keys (B, r, r, n) of resolution r and their factor w_r / sum (B, r, r, 1)."""
        keys = maps[r].reshape(batch * r * r, 1, r, r).float()
        if r != out_res:
            keys = F.interpolate(
                keys, size=(out_res, out_res), mode="bilinear", align_corners=False
            )
        keys = keys.reshape(batch, r, r, n)
        sums = keys.sum(-1, keepdim=True)
        if check_values and bool((sums <= 0).any()):
            b, qy, qx, _ = (int(i) for i in torch.nonzero(sums <= 0)[0])
            raise ValueError(
                f"maps[{r}] has a key map with zero total attention (image {b}, query row "
                f"{qy * r + qx}); every row must be a probability distribution"
            )
        return keys, w[r] / sums

    # The coarse resolutions are summed on the coarsest query grid that holds them, from coarse
    # to fine (tiling nests: query y of grid r_big takes y // (r_big // r_small) of r_small), so
    # the full (n, n) tensor is written once, by the final fused multiply-add. Memory: the output
    # plus the upsampled keys of one coarse resolution (a quarter of the output at 32).
    acc: Tensor | None = None  # (B, g, g, n) on query grid g
    g = 0
    for r in sorted(r for r in res if w[r] > 0 and r != out_res):
        keys, scale = scaled_keys(r)
        keys.mul_(scale)  # keys is a fresh tensor (interpolate's output)
        if acc is None:
            acc, g = keys, r
        elif r % g == 0:
            t = r // g
            keys.view(batch, g, t, g, t, n).add_(acc.view(batch, g, 1, g, 1, n))
            acc, g = keys, r
        else:  # grids that do not nest: tile what we have to the output grid
            t = out_res // g
            acc = (
                acc.view(batch, g, 1, g, 1, n)
                .expand(batch, g, t, g, t, n)
                .reshape(batch, out_res, out_res, n)
            )
            g = out_res
            t = out_res // r
            acc.view(batch, r, t, r, t, n).add_(keys.view(batch, r, 1, r, 1, n))
    if w.get(out_res, 0) > 0:
        keys, scale = scaled_keys(out_res)
        if acc is None:
            out = keys * scale
        else:
            t = out_res // g
            shape = (batch, g, t, g, t, n)
            out = torch.addcmul(
                acc.view(batch, g, 1, g, 1, n),
                keys.view(shape),
                scale.view(batch, g, t, g, t, 1),
            )
    else:
        assert acc is not None
        t = out_res // g
        out = acc.view(batch, g, 1, g, 1, n).expand(batch, g, t, g, t, n).contiguous()
    return out.view(batch, n, out_res, out_res)


def attention_of(features: Features | Mapping[int, Tensor]) -> Mapping[int, Tensor]:
    """The ``{grid: (B, N, N)}`` self-attention of a :class:`Features` (or the dict itself)."""
    if isinstance(features, Features):
        if not features.self_attention:
            raise ValueError("these features hold no self-attention maps; request them first")
        return features.self_attention
    return features
