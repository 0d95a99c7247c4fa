"""PAMR and the 3x3 median against explicit per-pixel loops."""

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from diffseg.ops.pamr import median3x3, neighbour_index, pamr, refine_labels

# One torch thread: on a loaded 2-core machine threads waiting on each other cost 10x.
pytestmark = pytest.mark.usefixtures("one_thread")


def _pixel(x: np.ndarray, r: int, c: int) -> np.ndarray:
    """x[:, r, c] with replicate borders."""
    return x[:, min(max(r, 0), x.shape[1] - 1), min(max(c, 0), x.shape[2] - 1)]


def _pamr_loop(image, masks, num_iter, dilations, sigma_scale):
    """PAMR for one image written pixel by pixel, in float64: image (C, H, W), masks (K, H, W)."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    _, h, w = image.shape
    offsets = [(dr * d, dc * d) for d in dilations for dr, dc in ring]
    weights = np.zeros((len(offsets), h, w))
    for r, c in itertools.product(range(h), range(w)):
        centre = image[:, r, c]
        samples = [_pixel(image, r + dr, c + dc) for dr, dc in offsets]
        samples += [centre] * len(dilations)
        sigma = np.std(np.stack(samples), axis=0, ddof=1)  # per channel
        logits = [
            np.mean(-np.abs(centre - _pixel(image, r + dr, c + dc)) / (1e-8 + sigma_scale * sigma))
            for dr, dc in offsets
        ]
        e = np.exp(np.array(logits) - max(logits))
        weights[:, r, c] = e / e.sum()
    m = masks.astype(np.float64)
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for r, c in itertools.product(range(h), range(w)):
            for j, (dr, dc) in enumerate(offsets):
                new[:, r, c] += weights[j, r, c] * _pixel(m, r + dr, c + dc)
        m = new
    return m


def test_pamr_matches_pixel_loop():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 6, 7, generator=g)
    masks = torch.rand(2, 2, 6, 7, generator=g)
    out = pamr(image, masks, num_iter=3, dilations=(1, 2), sigma_scale=0.1)
    assert out.shape == (2, 2, 6, 7) and out.dtype == torch.float32
    for i in range(2):
        expected = _pamr_loop(image[i].double().numpy(), masks[i].numpy(), 3, (1, 2), 0.1)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pamr_seediff_settings_and_changes_masks():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 5, 6, generator=g) * 255
    mask = torch.rand(1, 1, 5, 6, generator=g)
    before = mask.clone()
    out = pamr(image, mask, num_iter=4, dilations=(1,), sigma_scale=0.2)
    assert torch.equal(mask, before)  # the input is left alone
    expected = _pamr_loop(image[0].double().numpy(), mask[0].numpy(), 4, (1,), 0.2)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, mask)


def test_pamr_zero_iterations_is_identity_and_rows_are_averages():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 8, 8, generator=g)
    masks = torch.rand(1, 3, 8, 8, generator=g)
    assert torch.equal(pamr(image, masks, num_iter=0), masks)
    # weights are a convex combination: a constant mask stays constant
    const = torch.full((1, 1, 8, 8), 0.25)
    torch.testing.assert_close(pamr(image, const, num_iter=5), const)


def test_pamr_rejects_mismatched_grids():
    with pytest.raises(ValueError):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))


def test_neighbour_index_clamps_at_borders():
    index = neighbour_index(3, 4, (1, 2))
    assert index.shape == (16, 12)
    # pixel (0, 0): ring step (-1, -1) clamps to itself; step (1, 1) at d=2 is (2, 2)
    assert index[0, 0] == 0
    assert index[8 + 7, 0] == 2 * 4 + 2
    # pixel (1, 3): step (0, 1) clamps to (1, 3); step (1, -1) at d=2 is (2, 1)
    assert index[4, 7] == 7
    assert index[8 + 5, 7] == 2 * 4 + 1


def test_median3x3_matches_scipy_reflect():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (2, 9, 11), generator=g)
    expected = median_filter(labels.numpy(), size=(1, 3, 3), mode="reflect")
    out = median3x3(labels)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), expected)
    # a lone pixel disappears; a 2x2 block keeps its corner pixel (the border repeats it)
    x = torch.zeros(6, 6, dtype=torch.long)
    x[3, 3] = 7
    x[:2, :2] = 4
    y = median3x3(x)
    assert y[3, 3] == 0 and y[0, 0] == 4 and y[1, 1] == 0


def test_refine_labels_ranks_labels_and_cleans_noise():
    # Two flat colour halves; labels follow the halves with ids 3 and 9, plus salt noise.
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    labels = torch.full((1, 16, 16), 3)
    labels[..., 8:] = 9
    labels[0, 4, 4] = 9
    labels[0, 12, 12] = 3
    out = refine_labels(image, labels)
    expected = torch.zeros(1, 16, 16, dtype=torch.long)
    expected[..., 8:] = 1
    assert out.dtype == torch.int64
    assert torch.equal(out, expected)
