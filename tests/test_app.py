"""app.py without a browser: command-line mistakes, and the page's controls to a method's
per-call parameters (the browser test drives the page itself)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason="gradio is not installed (.[app])"
)


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(REPO))
    try:
        import app as module
    finally:
        sys.path.remove(str(REPO))
    return module


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "sd99"], "error: --backbone sd99 is unknown; choose one of "),
        (["--method", "nope"], "error: --method nope is unknown; choose one of "),
        (["--backbone", "tiny", "--image-size", "100"], "error: image_size=100 is invalid"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(app, args, message, capsys, monkeypatch):
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(SystemExit) as stop:
        app.main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1
    assert "sd14" in err or "diffcut" in err or "invalid" in err


def test_controls_become_the_method_parameters(app, one_thread):
    from diffseg import Segmenter

    small = ["image_size=128", "resolution=64"]
    controls = {"kl_threshold": 0.7, "num_points": 8.0, "tau": 0.4, "alpha": 12.0,
                "refine": True, "num_clusters": 5.0}  # fmt: skip
    seg = Segmenter("diffseg", "tiny", overrides=small)
    assert app.params_from_controls(seg, controls) == {
        "kl_threshold": 0.7,
        "num_points": 8,
        "refine": True,
    }
    ks = Segmenter("kmeans_s", "tiny", overrides=small, model=seg.model)
    assert app.params_from_controls(ks, controls) == {"num_classes": 5}
    params, random = app.defaults_for("diffcut", "tiny", small)
    assert random is True and params["tau"] == 0.2  # DiffCut's tau on SD 1.x-shaped models
    assert app.error_text(ValueError("boom")).startswith("**error:** ValueError: boom")
