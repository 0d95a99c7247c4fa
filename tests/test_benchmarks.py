"""Smoke tests: every script in benchmarks/ runs to its end at tiny sizes and prints its figures.

Each script's ``main(argv)`` is run in this process (the imports of torch, diffusers and the
tiny models are paid once for the file). The figures themselves are timings: only their presence
and form are checked, plus the correctness checks the scripts make on their own (e.g. DiffCut's
vectorised cut against the literal reference).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import diffseg

BENCHMARKS = Path(diffseg.__file__).resolve().parents[1] / "benchmarks"

#: script -> the arguments of its smoke run (tiny models and inputs, one image).
SMOKE_ARGS = {
    "segmentor.py": ["--images", "1", "--grid", "16", "--output-size", "64", "--device", "cpu",
                     "--baselines", "--threads", "1"],
    "metrics.py": ["--images", "2", "--size", "64", "--repeats", "1", "--device", "cpu",
                   "--threads", "1"],
    "diffcut.py": ["--images", "1", "--tokens", "8", "--channels", "32", "--output-size", "32",
                   "--threads", "1", "--extraction", "--image-size", "128"],
    "backbone.py": ["--config", "tiny", "--device", "cpu", "--image-size", "64", "--repeats", "1",
                    "--warmup", "0", "--threads", "1"],
    "pipeline.py": ["--device", "cpu", "--batches", "1", "--images", "1", "--image-size", "128",
                    "--resolution", "32", "--workers", "0"],
    "seediff.py": ["--configs", "tiny", "--steps", "1", "--image-size", "64",
                   "--pamr-iterations", "2", "--threads", "1"],
    "mmdit.py": ["--config", "tiny_sd3", "--size", "256", "--repeats", "1"],
}  # fmt: skip


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, capsys, tmp_path=None, extra=()) -> str:
    _script(name).main([*SMOKE_ARGS[name], *extra])
    return capsys.readouterr().out


def test_every_script_has_a_smoke_test():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(SMOKE_ARGS)


def test_make_bench_runs_every_script():
    makefile = (BENCHMARKS.parent / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert sorted(re.findall(r"benchmarks/(\w+\.py)", recipe)) == sorted(SMOKE_ARGS)


def test_segmentor(capsys, tmp_path, one_thread):
    out = _run("segmentor.py", capsys, extra=["--json", str(tmp_path / "s.json")])
    assert "== diffseg on cpu" in out and "== kmeans_c on cpu" in out
    assert re.search(r"steps \(s, median\): aggregate [\d.]+, first_iteration", out)
    kl = json.loads((tmp_path / "s.json").read_text())["results"]["diffseg/cpu"]["kl"]
    assert kl["anchors"] == 256 and kl["maps"] == 256
    assert kl["max_abs_diff"] < 1e-3  # matrix-product KL agrees with the direct formula


def test_metrics(capsys, one_thread):
    out = _run("metrics.py", capsys)
    assert "2 images 64x64" in out
    assert re.search(r"numpy\s+1\s+[\d.]+\s+[\d.]+", out)
    assert re.search(r"assignment only\s+-\s+[\d.]+", out)


def test_diffcut(capsys, tmp_path, one_thread):
    out = _run("diffcut.py", capsys, extra=["--json", str(tmp_path / "d.json")])
    assert "algorithm per image (cut + assignment + PAMR)" in out
    figures = json.loads((tmp_path / "d.json").read_text())
    assert figures["extraction_model"] == "tiny_sdxl" and figures["extraction_s"] > 0
    assert figures["cut_s"] > 0 and figures["segments"][0] >= 1


def test_backbone(capsys, one_thread):
    out = _run("backbone.py", capsys)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"batch"')]
    cases = {r["case"] for r in rows}
    assert {"unet_plain", "unet_capture[probs]", "vae_encode", "attention_maps"} <= cases
    assert "capture[probs] / plain UNet pass" in out and "RANDOM WEIGHTS" in out


def test_pipeline(capsys, one_thread):
    out = _run("pipeline.py", capsys)
    for method in ("diffseg", "diffcut"):
        assert re.search(rf"{method}\s+batch\s+1 float32\s+[\d.]+ img/s \| data", out), out
    assert "(2 images," in out  # one warm-up + one timed image


def test_pipeline_refuses_zero_images(capsys):
    with pytest.raises(SystemExit) as exc:
        _script("pipeline.py").main(["--images", "0"])
    assert exc.value.code == 2 and "--images must be >= 1" in capsys.readouterr().err


def test_seediff(capsys, one_thread):
    out = _run("seediff.py", capsys)
    row = json.loads(out.strip().splitlines()[-1])
    assert row["config"] == "tiny" and row["image_size"] == 64 and row["unet_calls"] >= 1
    assert row["seediff_s"] > 0 and "pamr_2_s" in row


def _json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_mmdit(capsys, one_thread):
    out = _run("mmdit.py", capsys)
    rows = _json_rows(out)
    assert {r["case"] for r in rows} == {"encode", "plain", "capture_i2t", "capture_i2i", "extract"}
    assert all(r["wall_s"] > 0 and r["config"] == "tiny_sd3" for r in rows)
    assert {r["block"] for r in rows if r["case"] == "plain"} == {3}  # the backbone's default
    assert all(r["stack"] == "10 of 10 joint blocks (full stack)" for r in rows)
    assert not any(r["truncated"] for r in rows)
    assert re.search(r"block 3 capture_i2t/plain: wall [\d.]+x", out)


def test_mmdit_truncated_flux(capsys, one_thread):
    # tiny_flux has 2 double + 2 single blocks: keep 1 + 1, read the last of each kind
    _script("mmdit.py").main(["--config", "tiny_flux", "--size", "128", "--repeats", "1",
                              "--double-blocks", "1", "--single-blocks", "1"])  # fmt: skip
    out = capsys.readouterr().out
    stack = "1 of 2 double + 1 of 2 single blocks (TRUNCATED: real widths, heads, RoPE, text "
    stack += "length; fewer blocks; T5 1 of 2 layers)"
    assert out.splitlines()[0] == f"tiny_flux: {stack}"
    rows = _json_rows(out)
    assert all(r["stack"] == stack and r["truncated"] for r in rows)
    assert sorted(r["block"] for r in rows if r["case"] == "capture_i2t") == [0, 1]
    for block in (0, 1):
        assert re.search(rf"block {block} capture_i2i/plain: wall [\d.]+x", out)


def test_mmdit_truncated_sd3(capsys, one_thread):
    # SD3's last block is built as the model's final one (no text output): the last but one is read
    _script("mmdit.py").main(["--config", "tiny_sd3", "--size", "128", "--repeats", "1",
                              "--blocks", "4"])  # fmt: skip
    rows = _json_rows(capsys.readouterr().out)
    assert {r["block"] for r in rows if r["case"] != "encode"} == {2}
    assert rows[0]["stack"].startswith("4 of 10 joint blocks (TRUNCATED")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config", "flux_random", "--double-blocks", "20"],
            "--blocks must be in 1 .. 19 for 'flux'",
        ),
        (["--config", "flux", "--single-blocks", "39"], "--single-blocks must be in 0 .. 38"),
        (["--config", "sd3_random", "--single-blocks", "1"], "for FLUX configs; 'sd3' has joint"),
    ],
)
def test_mmdit_refuses_a_stack_it_cannot_build(capsys, args, message):
    with pytest.raises(SystemExit) as exc:  # refused before any model is built
        _script("mmdit.py").main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
