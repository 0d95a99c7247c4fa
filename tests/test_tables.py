"""experiments/make_tables.py on results.json files shaped as the runner writes them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import make_tables  # noqa: E402

SPEC = REPO.parent / "shared" / "SPEC.md"


def write_result(path: Path, **kw) -> Path:
    """A results.json like the runner's (only the keys make_tables reads, plus a few)."""
    res = {
        "dataset": {"name": kw.get("dataset", "coco_stuff27"), "curated": kw.get("curated", True)},
        "resolution": kw.get("resolution", 512),
        "backbone": {"name": kw.get("backbone", "sd14")},
        "random_weights": kw.get("random", False),
        "method": {"name": kw.get("method", "diffseg"), **kw.get("params", {})},
        "segmentor": kw.get("segmentor"),
        "setting": kw.get("setting"),
        "acc": kw.get("acc", 70.0),
        "miou": kw.get("miou", 40.0),
        "num_images": kw.get("images", 2175),
        "images_expected": kw.get("expected", 2175),
    }
    if res["segmentor"] is None:
        del res["segmentor"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(res))
    return path / "results.json"


DIFFSEG = {"kl_threshold": 1.1, "num_points": 16, "num_iterations": 3, "refine": False}


def test_paper_numbers_match_spec_section_8():
    rows = {r["key"]: r for r in make_tables.load_paper()}
    expected = {
        "coco_diffseg_512": (72.5, 43.6),
        "coco_diffseg_320": (72.5, 43.0),
        "coco_kmeans_c_512": (58.9, 33.7),
        "coco_kmeans_s_512": (62.6, 34.7),
        "coco_stego": (56.9, 28.2),
        "coco_reco": (46.1, 26.3),
        "coco_maskclip": (32.2, 19.6),
        "coco_picie": (48.1, 13.8),
        "cityscapes_diffseg_320": (76.0, 21.2),
    }
    assert {k: (r["acc"], r["miou"]) for k, r in rows.items()} == expected
    if SPEC.is_file():  # the numbers as the spec's table states them
        text = SPEC.read_text()
        for acc, miou in expected.values():
            assert f"{acc} / {miou}" in text or f"| {acc} | {miou} |" in text


def test_matching_uses_dataset_method_resolution_and_settings(tmp_path):
    paper = make_tables.load_paper()

    def match(**kw):
        f = write_result(tmp_path / "m", **kw)
        return make_tables.paper_row(json.loads(f.read_text()), paper)

    assert match(params=DIFFSEG)["key"] == "coco_diffseg_512"
    assert match(params=DIFFSEG, resolution=320)["key"] == "coco_diffseg_320"
    # the segmentor's own description (thresholds per iteration) wins over the config
    seg = {
        "name": "diffseg",
        "kl_threshold": [1.1, 1.1, 1.1],
        "num_iterations": 3,
        "num_points": 16,
        "refine": False,
    }
    assert match(params=DIFFSEG, segmentor=seg)["key"] == "coco_diffseg_512"
    assert match(params={**DIFFSEG, "kl_threshold": 0.9}) is None  # an ablation setting
    assert match(params=DIFFSEG, curated=False) is None
    assert match(params=DIFFSEG, resolution=448) is None
    city = match(dataset="cityscapes", resolution=320, params={**DIFFSEG, "kl_threshold": 0.9})
    assert city["key"] == "cityscapes_diffseg_320"
    assert match(method="kmeans_c", params={"num_clusters": 6})["key"] == "coco_kmeans_c_512"
    assert match(method="kmeans_c", params={"num_clusters": 8}) is None
    assert match(method="kmeans_s", params={"num_clusters": None})["key"] == "coco_kmeans_s_512"


def test_tables_show_differences_and_flag_random_runs(tmp_path, capsys):
    write_result(tmp_path / "runs/a", params=DIFFSEG, acc=71.34, miou=44.0)
    write_result(
        tmp_path / "runs/b/kl_threshold=0.9",
        params={**DIFFSEG, "kl_threshold": 0.9},
        setting="kl_threshold=0.9",
        acc=60.0,
        miou=30.0,
    )
    write_result(
        tmp_path / "runs/c",
        method="kmeans_c",
        params={"num_clusters": 6},
        acc=58.0,
        miou=33.0,
        images=100,
    )
    write_result(
        tmp_path / "smoke", params=DIFFSEG, backbone="tiny", random=True, acc=12.3, miou=4.5
    )
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/results.json").write_text(json.dumps({"acc": None, "miou": None}))

    out = tmp_path / "tables"
    assert (
        make_tables.main(
            [
                str(tmp_path / "runs"),
                str(tmp_path / "smoke"),
                str(tmp_path / "folder"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    md = capsys.readouterr().out
    assert md == (out / "tables.md").read_text()
    results, rest = md.split("## ⚠ RANDOM WEIGHTS")
    # trained-weight runs, with the paper's numbers and the difference
    assert "| 71.3 | 72.5 | -1.2 | 44.0 | 43.6 | +0.4 |" in results
    assert "DiffSeg (kl_threshold=0.9)" in results and "| 60.0 | – | – |" in results
    assert "100/2175 (partial)" in results
    assert "12.3" not in results  # the random run is not among the results...
    random_part = rest.split("## The paper's numbers")[0]
    assert "12.3" in random_part and "tiny ⚠ RANDOM WEIGHTS" in random_part  # ...but flagged
    assert "| COCO-Stuff-27 | STEGO (trained, reported) | 56.9 | 28.2 |" in md
    tex = (out / "tables.tex").read_text()
    assert r"\toprule" in tex and "-1.2" in tex and "12.3" not in tex
    assert "1 run(s) on RANDOM WEIGHTS left out" in tex
    assert r"DiffSeg (kl\_threshold=0.9)" in tex


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert make_tables.main([str(tmp_path), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "no results.json" in err


@pytest.mark.parametrize("value", [None, float("nan")])
def test_missing_metric_rows_are_skipped(tmp_path, value):
    write_result(tmp_path / "x", acc=value, miou=value)
    assert make_tables.collect([tmp_path], make_tables.load_paper()) == []
