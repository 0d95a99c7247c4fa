"""SeeDiff's mask from recorded attention: foreground seeds at 16, expansion 16 -> 32 -> 64.

Notation (shapes for SD v1 at 512 px; every function also takes the grids ``r, 2r, 4r`` of other
image sizes):

- ``mm(v) = (v - min v) / (max v - min v)``; a constant input gives zeros (the released code
  would divide by zero and return NaN, which thresholds to an empty mask).
- ``Otsu(v)``: Otsu's threshold (OpenCV ``THRESH_BINARY + THRESH_OTSU``) on the integer image
  ``floor(255 * v**2)`` stored as **uint16**, so values of ``v`` above 1 (bicubic overshoot)
  keep their order instead of wrapping or saturating at 255. A token "passes" when its integer
  is strictly above the threshold.
- ``E(seeds, S)[i] = sum_{s in seeds} cos(S[i, :], S[s, :])``: how much token ``i`` "looks
  like" the seed tokens, by the cosine of whole rows of a self-attention descriptor ``S``.

Steps: (1) the five 16x16 cross-attention maps of the class token, each min-max normalised (and
scaled by 0.01 when its variance is tiny), summed and normalised into ``C``; the tokens where
``C`` passes Otsu are the foreground seeds; ``m16 = mm(E(seeds, S16))``. (2) at 32 and 64, the
bicubic upsampling ``P`` of the previous map (overshoot kept) gives **background** seeds (tokens
that do not pass Otsu) and ``m = mm(mm(1 - E(bg, S)) * mm(P))``. (3) the soft mask is ``mm`` of
the bicubic upsampling of ``m64`` to the image size.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bicubic",
    "combine_cross_attention",
    "expand",
    "expansion_step",
    "foreground_map",
    "minmax",
    "otsu_pass",
    "refine_mask",
    "soft_mask",
]

#: Layers whose head-summed map has an unbiased variance at or below this are down-weighted.
VARIANCE_FLOOR = 1e-4
#: The weight of such a flat layer after normalisation.
FLAT_LAYER_WEIGHT = 0.01
#: OpenCV's Otsu on 16-bit images takes values up to this.
_UINT16_MAX = np.iinfo(np.uint16).max


def minmax(x: Tensor) -> Tensor:
    """``(x - min) / (max - min)`` over all elements; zeros when ``x`` is constant."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def otsu_pass(values: Tensor | np.ndarray) -> Tensor:
    """Which elements pass Otsu's threshold on ``floor(255 * v**2)`` as uint16.

    Args:
        values: float (r, r) (any 2-D shape), any range; squared, so the sign is lost.

    Returns:
        bool tensor of the same shape on the CPU: True where the integer value is strictly above
        OpenCV's Otsu threshold.
    """
    v = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else values
    v = np.asarray(v, dtype=np.float32)
    # float32 square times 255, truncated (= floor for these non-negative values) to uint16.
    scaled = (v * v) * np.float32(255)
    integers = np.minimum(scaled, _UINT16_MAX).astype(np.uint16)
    _, passed = cv2.threshold(integers, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return torch.from_numpy(passed > 0)


def expand(seeds: Tensor, descriptor: Tensor) -> Tensor:
    """``E(seeds, S)``: for every token, the summed cosine similarity of its descriptor row to the
    seed tokens' rows.

    Args:
        seeds: bool (N,) (or any shape with N elements), which tokens are seeds.
        descriptor: float (N, N) self-attention descriptor (rows = tokens).

    Returns:
        float32 (N,) on the descriptor's device; zeros when there is no seed.
    """
    s = descriptor.float()
    # torch's cosine_similarity clamps the product of norms at eps=1e-8; for rows of attention
    # probabilities (norm >= 1/sqrt(N)) the clamp never acts, so unit rows are exact.
    unit = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8)
    mask = seeds.reshape(-1).to(device=s.device)
    seed_sum = unit[mask].sum(dim=0)  # (N,)
    return unit @ seed_sum


def bicubic(x: Tensor, side: int) -> Tensor:
    """OpenCV ``INTER_CUBIC`` resize of a square float map to ``(side, side)``; values may leave
    the input's range (overshoot) and are kept. Float32, on the input's device."""
    out = cv2.resize(x.detach().float().cpu().numpy(), (side, side), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(out).to(x.device)


def combine_cross_attention(
    cross: Tensor,
    variance_floor: float = VARIANCE_FLOOR,
    flat_weight: float = FLAT_LAYER_WEIGHT,
) -> Tensor:
    """``C = mm(sum_l c_l)`` with ``c_l = mm(map_l)``, or ``flat_weight * mm(map_l)`` when the
    layer's unbiased variance is ``<= variance_floor`` (a layer that hardly sees the class).

    Args:
        cross: float (L, r, r), the class token's head-summed, step-averaged maps.

    Returns:
        float32 (r, r) in [0, 1].
    """
    if cross.dim() != 3 or cross.shape[1] != cross.shape[2] or cross.shape[0] == 0:
        raise ValueError(
            f"cross-attention maps must be (L, r, r) with L >= 1, got {tuple(cross.shape)}"
        )
    maps = cross.float()
    flat = maps.flatten(1).var(dim=1) <= variance_floor  # (L,) torch's unbiased variance
    normed = torch.stack([minmax(m) for m in maps])
    weights = torch.where(flat, flat_weight, 1.0).to(normed)
    return minmax((normed * weights[:, None, None]).sum(dim=0))


def foreground_map(combined: Tensor, descriptor: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1: seeds where ``combined`` passes Otsu, expanded through ``descriptor``.

    Args:
        combined: float (r, r), :func:`combine_cross_attention`'s output.
        descriptor: float (r*r, r*r).

    Returns:
        ``(m, seeds)``: float32 (r, r) ``mm(E(seeds, S))`` and bool (r, r) seeds (CPU).
    """
    r = combined.shape[-1]
    seeds = otsu_pass(combined)
    return minmax(expand(seeds, descriptor)).reshape(r, r), seeds


def expansion_step(previous: Tensor, descriptor: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 2-3: one level up with background seeds.

    Args:
        previous: float (r, r), the map of the coarser level.
        descriptor: float (R*R, R*R) at the finer grid ``R`` (normally ``2 r``).

    Returns:
        ``(m, seeds)``: float32 (R, R) ``mm(mm(1 - E(bg, S)) * mm(P))`` with ``P`` the bicubic
        prior, and bool (R, R) background seeds (tokens where ``P`` does not pass Otsu).
    """
    side = int(round(descriptor.shape[0] ** 0.5))
    prior = bicubic(previous, side)
    background = ~otsu_pass(prior)
    similarity = expand(background, descriptor).reshape(side, side)
    return minmax(minmax(1 - similarity) * minmax(prior.to(similarity))), background


def soft_mask(
    cross: Tensor,
    self_attention: dict[int, Tensor],
    size: int = 512,
    variance_floor: float = VARIANCE_FLOOR,
    flat_weight: float = FLAT_LAYER_WEIGHT,
    return_steps: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """SeeDiff's soft mask of the class.

    Args:
        cross: float (L, r, r), the class token's cross-attention maps (head-summed,
            step-averaged) of the recorded layers; SD v1 at 512: r = 16, L = 5.
        self_attention: three head-summed self-attention descriptors keyed by grid side,
            ``{16: (256, 256), 32: (1024, 1024), 64: (4096, 4096)}`` (smallest = ``r``).
        size: side of the output (the image's).
        return_steps: also return the intermediate maps and seeds (``m16``, ``seeds16``, ...).

    Returns:
        float32 (size, size) in [0, 1], on the device of the descriptors (and the steps dict).
    """
    sides = sorted(self_attention)
    if len(sides) < 2:
        raise ValueError(f"need self-attention at two or more grid sides, got {sides}")
    for r in sides:
        if tuple(self_attention[r].shape) != (r * r, r * r):
            raise ValueError(
                f"self-attention descriptor at {r} must be ({r * r}, {r * r}), "
                f"got {tuple(self_attention[r].shape)}"
            )
    if cross.shape[-1] != sides[0]:
        raise ValueError(f"cross-attention side {cross.shape[-1]} != smallest grid {sides[0]}")
    device = self_attention[sides[0]].device
    combined = combine_cross_attention(cross.to(device), variance_floor, flat_weight)
    m, seeds = foreground_map(combined, self_attention[sides[0]])
    steps = {"cross": combined, f"m{sides[0]}": m, f"seeds{sides[0]}": seeds}
    for r in sides[1:]:
        m, seeds = expansion_step(m, self_attention[r])
        steps[f"m{r}"], steps[f"seeds{r}"] = m, seeds
    soft = minmax(bicubic(m, size))
    return (soft, steps) if return_steps else soft


def refine_mask(
    mask: Tensor,
    image: Tensor,
    num_iter: int = 5000,
    sigma_scale: float = 0.2,
    threshold: float = 0.8,
) -> Tensor:
    """PAMR refinement of a binary mask: one channel (the mask as 0/1 floats) propagated over the
    image's 8-neighbour affinities (dilation 1 only), then ``mm(out) > threshold``.

    Args:
        mask: bool (H, W).
        image: (H, W, 3) RGB with values 0..255 (uint8 or float), on any device; used as float.
        num_iter: PAMR iterations (5000 in the release; a 3x3 stencil per iteration).
        sigma_scale: the factor on the local standard deviation (0.2 in the release).
        threshold: on the min-max normalised PAMR output.

    Returns:
        bool (H, W) on the mask's device. A constant PAMR output (an empty or full mask stays
        so) returns ``mask`` unchanged instead of the release's NaN (empty) mask.
    """
    from diffseg.ops.pamr import pamr

    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {tuple(image.shape)} does not match mask {tuple(mask.shape)}")
    rgb = image.to(device=mask.device, dtype=torch.float32).permute(2, 0, 1)[None]
    out = pamr(
        rgb, mask.float()[None, None], num_iter=num_iter, dilations=(1,), sigma_scale=sigma_scale
    )
    out = out[0, 0]
    if bool(out.max() <= out.min()):
        return mask.clone()
    return minmax(out) > threshold
