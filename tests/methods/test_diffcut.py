"""DiffCut.segment_features and DiffCutAutoSC: the pipeline of diffseg.methods.ncut and diffseg.ops.pamr."""

import json

import pytest
import torch
import torch.nn.functional as F

from diffseg.methods.diffcut import DiffCut, DiffCutAutoSC
from diffseg.methods.ncut import assign_concepts, autosc_labels, ncut_labels
from diffseg.ops.pamr import refine_labels

# One torch thread: on a loaded 2-core machine threads waiting on each other cost 10x.
pytestmark = pytest.mark.usefixtures("one_thread")


def pamr_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """What PAMR looks at: the [-1, 1] input as [0, 1] RGB, bilinear (half-pixel) to size."""
    return F.interpolate((images + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)


def batch(seed: int = 0, b: int = 2, c: int = 32, h: int = 8):
    """Features (B, C, h, h) with left/right halves of different centres, and images in [-1, 1]
    whose halves differ the same way."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 2, c, generator=g)
    side = (torch.arange(h) >= h // 2).long()
    feats = centres[:, side].permute(0, 2, 1)[..., None, :].expand(b, c, h, h).clone()
    feats += 0.2 * torch.randn(b, c, h, h, generator=g)
    feats[:, :, 0, 0] = -centres[:, 0]  # an outlier token, as real features have
    right = torch.arange(32) >= 16
    images = torch.where(right[None, None, None, :], 0.8, -0.6).expand(b, 3, 32, 32)
    images = images + 0.05 * torch.randn(b, 3, 32, 32, generator=g)
    return feats, images


def test_segment_features_is_cut_then_assignment():
    feats, _ = batch()
    out = DiffCut(refine=False).segment_features(feats, output_size=16)
    assert out.shape == (2, 16, 16) and out.dtype == torch.int64
    for i in range(2):
        f = F.normalize(feats[i], dim=0)
        assert torch.equal(out[i], assign_concepts(f, ncut_labels(f), 16))
    assert (out[:, 4:, :6] != out[:, 4:, 10:]).all()  # the halves (away from the outlier)


def test_refine_runs_pamr_on_the_resized_image():
    feats, images = batch(1)
    out = DiffCut().segment_features(feats, output_size=16, images=images)
    raw = DiffCut(refine=False).segment_features(feats, output_size=16)
    assert torch.equal(out, refine_labels(pamr_image(images, 16), raw))


def test_refine_needs_images_and_features_must_be_4d():
    feats, _ = batch()
    with pytest.raises(ValueError, match="images"):
        DiffCut().segment_features(feats)
    with pytest.raises(ValueError, match="features"):
        DiffCut(refine=False).segment_features(feats[0])


def test_default_output_size_is_mask_size():
    feats, _ = batch(b=1)
    assert DiffCut(refine=False, mask_size=24).segment_features(feats).shape == (1, 24, 24)


def test_tau_controls_the_splits():
    feats, _ = batch(2, b=1)
    none = DiffCut(tau=0.0, refine=False).segment_features(feats, 8)  # no cut is below 0
    assert none.unique().tolist() == [0]
    assert DiffCut(refine=False).segment_features(feats, 8).unique().numel() >= 2


def test_describe_and_repr():
    d = DiffCut()
    info = d.describe()
    assert json.loads(json.dumps(info)) == info
    expected = {"tau": 0.5, "alpha": 10, "num_thresholds": 100, "mask_size": 128, "refine": True}
    expected |= {"pamr_iter": 10, "pamr_dilations": [1, 2, 4, 8]}
    assert {k: info[k] for k in expected} == expected
    assert repr(d).startswith("DiffCut(tau=0.5, alpha=10.0,")
    auto = DiffCutAutoSC()
    assert auto.describe()["alphas"] == [1, 5, 10, 15] and auto.describe()["refine"] is False
    assert repr(auto).startswith("DiffCutAutoSC(alphas=[1.0, 5.0, 10.0, 15.0]")


def test_autosc_segment_features():
    feats, images = batch(3, b=1)
    out = DiffCutAutoSC().segment_features(feats, output_size=16)
    f = F.normalize(feats[0], dim=0)
    assert torch.equal(out[0], assign_concepts(f, autosc_labels(f), 16))
    refined = DiffCutAutoSC(refine=True).segment_features(feats, output_size=16, images=images)
    assert torch.equal(refined, refine_labels(pamr_image(images, 16), out))
