"""The method contract around the engine: label refinement and the background merge order."""

from __future__ import annotations

import torch

from diffseg import DiffSeg, FeatureRequest, Features
from diffseg.engine.loop import predict
from diffseg.methods import Method, RefiningMethod
from diffseg.ops.pamr import images_for_labels, pamr_refine
from diffseg.testing import synthetic_attention as sa
from eval.metrics import merge_background

SMALL = (16, 8, 4)


def _features(labels: torch.Tensor) -> Features:
    """Structured attention for ``labels`` (B, 16, 16) and images whose colour follows them."""
    maps = sa.make_maps(labels, 6.0, resolutions=SMALL)
    images = (labels[:, None].float().repeat(1, 3, 1, 1) / labels.max().clamp_min(1)) * 2 - 1
    images = torch.nn.functional.interpolate(images, size=(64, 64), mode="nearest")
    return Features(self_attention=maps, images=images)


def test_diffseg_meets_the_contract_and_pamr_is_its_last_step():
    labels = torch.stack([sa.block_labels(2, 2, 16), sa.block_labels(1, 2, 16)])
    feats = _features(labels)
    method = DiffSeg(num_points=8, pamr=True)
    assert isinstance(method, Method) and method.refines()
    assert method.feature_request() == FeatureRequest(self_attention="all")
    raw = method.segment_unrefined(feats, 32)
    out = method.segment(feats, 32)
    assert out.shape == (2, 32, 32) and out.dtype == torch.int64
    torch.testing.assert_close(out, pamr_refine(raw, feats))
    assert [int(o.unique().numel()) for o in out] == [4, 2]
    assert not DiffSeg().refines()


def test_images_for_labels_is_rgb_in_unit_range_on_the_label_grid():
    images = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    out = images_for_labels(images, 4)
    assert out.shape == (2, 3, 4, 4) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(images_for_labels(images, 8), (images + 1) / 2)


class _Recorder(RefiningMethod):
    """A method whose refinement records what it was given."""

    name = "rec"

    def refines(self) -> bool:
        return True

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels, self.seen = labels, None

    def segment_unrefined(self, features, size, hints=None):
        return self.labels.clone()

    def refine_labels(self, labels, features):
        self.seen = labels.clone()
        return labels + 100


def test_background_merge_comes_between_segmenting_and_refining():
    pred = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]])
    # classes: 0 (object) on segment 0, background (2) elsewhere
    label = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]]])
    method = _Recorder(pred)
    out = predict(method, None, 4, None, list(label), background=(2, 3))
    expected = merge_background(pred[0], label[0], 2, 3)
    assert torch.equal(method.seen[0], expected)  # refinement saw the merged labels
    assert torch.equal(out[0], expected + 100)
    assert int(expected.unique().numel()) < int(pred.unique().numel())
    # no background class: the method's own segment() is all there is
    plain = DiffSeg(num_points=8)
    feats = _features(torch.stack([sa.block_labels(2, 2, 16)]))
    torch.testing.assert_close(
        predict(plain, feats, 16, None, None, None), plain.segment(feats, 16)
    )


def test_diffseg_on_sdxl_and_sd21_grids():
    """SDXL family at 1024: grids 64 and 32 (aggregated 64x64, x16 to 1024); SD 2.1 at 768:
    96/48/24/12 (aggregated 96x96, x8 to 768)."""
    for grids, size, out in (((64, 32), 64, 1024), ((96, 48, 24, 12), 96, 768)):
        labels = sa.block_labels(2, 3, size)[None]
        maps = sa.make_maps(labels, 6.0, resolutions=grids)
        method = DiffSeg()
        assert method.grid_size(maps) == size
        pred = method.segment(Features(self_attention=maps), out)
        assert pred.shape == (1, out, out) and pred.dtype == torch.int64
        assert sa.region_agreement(pred[0, :: out // size, :: out // size], labels[0]) == (1.0, 6)
