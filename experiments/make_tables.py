"""Turn run dirs into Markdown and LaTeX tables, next to the paper's numbers.

    python experiments/make_tables.py outputs multirun [--out experiments/tables]

Every ``results.json`` under the given folders (recursively; sweeps have one per setting) is a
row. A run whose dataset, method, evaluation resolution and settings are the paper's gets the
paper's ACC / mIoU (``experiments/paper_numbers.json``) beside its own; the difference is printed
only for a complete run on the full benchmark. A run on fewer images (``limit=``,
``dataset.curated=false``, ``dataset.ids_file=``, a copy of the dataset with fewer images than
the benchmark's official count, or interrupted: results.json's ``dataset.full_benchmark``,
``dataset.incomplete`` and ``complete``) is marked and gets no difference: its numbers are
not comparable. Runs on random weights (``backbone=tiny`` and the like) are never shown as
results: they go to a separate, flagged Markdown table and are left out of the LaTeX one. Prints
Markdown; with ``--out DIR`` also writes ``DIR/tables.md`` and ``DIR/tables.tex``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PAPER_FILE = Path(__file__).resolve().with_name("paper_numbers.json")
RANDOM_MARK = "RANDOM WEIGHTS"
DATASET_NAMES = {
    "coco_stuff27": "COCO-Stuff-27",
    "cityscapes": "Cityscapes-27",
    "cityscapes19": "Cityscapes-19",
    "voc": "Pascal VOC",
    "context": "Pascal Context",
    "context59": "Pascal Context-59",
    "coco_object": "COCO-Object",
    "ade20k": "ADE20K",
    "folder": "folder",
}
#: Runs with a dataset's other class list (``dataset.classes``) are a dataset of their own in
#: the tables: never shown as, or compared with, the default list's benchmark.
CLASS_VARIANTS = {("cityscapes", 19): "cityscapes19", ("context", 59): "context59"}
METHOD_NAMES = {
    "diffseg": "DiffSeg",
    "kmeans_c": "K-Means-C",
    "kmeans_s": "K-Means-S",
    "diffcut": "DiffCut",
    "diffcut_autosc": "AutoSC",
    "seg4diff": "Seg4Diff",
}
#: What the paper columns of a run say when no paper has its row (DiffSeg / DiffCut on MM-DiTs).
NO_PAPER = "no paper number"
#: The experiments whose rows no paper has (configs/experiment/).
NEW_ROWS = (
    "DiffSeg on an MM-DiT (`experiment=mmdit_diffseg`) and DiffCut on an MM-DiT "
    "(`experiment=mmdit_diffcut`)"
)
#: The MM-DiT backbones (Seg4Diff's family): only Seg4Diff has paper numbers on them.
MMDIT_BACKBONES = {"sd3", "sd35", "flux", "flux_schnell"}
MMDIT_FAMILIES = {"sd3", "flux"}


def find_results(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (files or folders), sorted, without duplicates."""
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "results.json":
            found[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob("results.json")):
                if ".hydra" not in f.parts and "wandb" not in f.parts:
                    found[f.resolve()] = None
    return list(found)


def load_paper(path: str | os.PathLike = PAPER_FILE) -> list[dict[str, Any]]:
    """The paper's rows (see experiments/paper_numbers.json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["rows"]


def _norm(value: Any) -> Any:
    """Settings compared loosely: a list of equal thresholds is that threshold; floats rounded."""
    if isinstance(value, (list, tuple)):
        values = [_norm(v) for v in value]
        if values and all(v == values[0] for v in values):
            return values[0]
        return values
    if isinstance(value, float):
        return round(value, 6)
    return value


def settings_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """A run's segmentor settings: the segmentor's own description when saved, else the config."""
    out = dict(result.get("method") or {})
    out.update(result.get("segmentor") or {})
    out.pop("name", None)
    return out


#: Random-weight backbones are matched to the row of the model whose layout they copy (their
#: numbers are flagged as random in every table, never compared for real).
STAND_INS = {
    "tiny": "sd14",
    "sd14_random": "sd14",
    "tiny_sdxl": "ssd1b",
    "sdxl_random": "ssd1b",
    "tiny_sd3": "sd3",
    "tiny_sd35": "sd35",
    "sd3_random": "sd3",
    "tiny_flux": "flux",
    "flux_random": "flux",
}


def _backbone(result: Mapping[str, Any]) -> str | None:
    name = result.get("backbone_name")
    return STAND_INS.get(name, name)


def dataset_key(result: Mapping[str, Any]) -> str | None:
    """The dataset a result is a row of: its name, or its class variant ("cityscapes19")."""
    ds = result.get("dataset") or {}
    return CLASS_VARIANTS.get((ds.get("name"), ds.get("classes")), ds.get("name"))


def paper_row(result: Mapping[str, Any], paper: Sequence[Mapping[str, Any]]) -> dict | None:
    """The paper row a result reproduces (same dataset, method, resolution and settings)."""
    dataset = dataset_key(result)
    method = (result.get("method") or {}).get("name")
    settings = settings_of(result)
    for row in paper:
        match = row.get("match")
        if not match or row.get("dataset") != dataset or match.get("method") != method:
            continue
        if match.get("resolution") != result.get("resolution"):
            continue
        if "backbone" in match and _backbone(result) != match["backbone"]:
            continue
        preprocessing = (result.get("dataset") or {}).get("preprocessing", "diffseg")
        if match.get("preprocessing", "diffseg") != preprocessing:
            continue
        # a row-matched run (Seg4Diff's released evaluator) is never set beside a paper number
        if result.get("matching", "image") != match.get("matching", "image"):
            continue
        if (
            "background_merge" in match
            and result.get("background_merge") != match["background_merge"]
        ):
            continue
        if (
            "curated" in match
            and bool((result.get("dataset") or {}).get("curated")) != match["curated"]
        ):
            continue
        if all(_norm(settings.get(k)) == _norm(v) for k, v in match.get("settings", {}).items()):
            return dict(row)
    return None


def no_paper_number(result: Mapping[str, Any], ref: Mapping[str, Any] | None) -> bool:
    """True for a row no paper has: a method other than Seg4Diff on an MM-DiT backbone
    (``experiment=mmdit_diffseg``, ``mmdit_diffcut``); such runs say so instead of a number."""
    if ref is not None or (result.get("method") or {}).get("name") == "seg4diff":
        return False
    family = (result.get("backbone") or {}).get("family")
    return family in MMDIT_FAMILIES or _backbone(result) in MMDIT_BACKBONES


def _short_path(path: Path) -> str:
    """The path relative to the working dir when it lies inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _num(x: Any) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


def coverage(result: Mapping[str, Any]) -> dict[str, Any]:
    """Which images a result covers: ``images`` (with a metric), ``expected`` (the run's images
    after its limit, or the benchmark's official count for a partial copy of the dataset),
    ``partial`` (the run did not finish them, or the copy lacks images), ``subset`` (why it is not the
    full benchmark, or None when it is). Results that do not say (an older layout) count as a
    subset: only a run that says it is the whole benchmark is compared with the paper."""
    ds = result.get("dataset") or {}
    images = result.get("num_images")
    expected = ds.get("num_images_run", result.get("images_expected"))
    complete = result.get("complete")
    partial = (complete is False) or (expected is not None and images != expected)
    if ds.get("incomplete"):  # a partial copy of the benchmark: found fewer than the official
        partial, expected = True, ds.get("images_expected")
    subset = None
    if not ds.get("full_benchmark"):
        if result.get("limit") is not None:
            size = ds.get("size")
            subset = f"limit={result['limit']}" + (f" of {size}" if size is not None else "")
        elif ds.get("ids_file"):
            subset = "ids_file"
        elif ds.get("curated") is False:
            subset = "curated=false"
        elif ds.get("incomplete"):
            subset = None  # marked partial, with the official count
        elif "full_benchmark" in ds:
            subset = "subset"
        else:
            subset = "full benchmark not recorded"
    return {"images": images, "expected": expected, "partial": partial, "subset": subset}


def comparable(row: Mapping[str, Any]) -> bool:
    """A difference to the paper is printed only for a complete run on the full benchmark."""
    return not row["partial"] and row["subset"] is None


def collect(paths: Iterable[str | os.PathLike], paper: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per results.json with a metric: what the tables show."""
    rows = []
    for f in find_results(paths):
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            print(f"warning: skipping unreadable {f} ({err})", file=sys.stderr)
            continue
        if _num(r.get("acc")) is None:  # image folders: no labels, no metric
            continue
        ref = paper_row(r, paper)
        method = (r.get("method") or {}).get("name", "?")
        setting = r.get("setting") or ""
        where = _short_path(f.parent)
        rows.append(
            {
                "path": where,
                "dataset": dataset_key(r) or "?",
                "method": method,
                "setting": setting,
                "resolution": r.get("resolution"),
                "backbone": (r.get("backbone") or {}).get("name", "?"),
                "random": bool(r.get("random_weights")),
                **coverage(r),
                "acc": _num(r.get("acc")),
                "miou": _num(r.get("miou")),
                "paper": ref,
                "no_paper": no_paper_number(r, ref),
            }
        )
    rows.sort(
        key=lambda x: (x["dataset"], x["method"], x["resolution"] or 0, x["setting"], x["path"])
    )
    return rows


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _d(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return "–"
    return f"{ours - paper:+.1f}"


def _images(row: Mapping[str, Any]) -> str:
    text = str(row["images"])
    if row["partial"]:
        text = f"{row['images']}/{row['expected']} (partial)"
    if row["subset"]:
        text += f" ({row['subset']})"
    return text


def _paper(row: Mapping[str, Any], key: str) -> str:
    """The paper's value of ``key`` beside a run: the number, with the paper row's status when it
    has one ("54.9 (UNCONFIRMED)"); "no paper number" for a row no paper has."""
    if row.get("no_paper"):
        return NO_PAPER
    paper = row["paper"] or {}
    text = _f(paper.get(key))
    return f"{text} ({paper['status']})" if paper.get("status") and text != "–" else text


def _delta(row: Mapping[str, Any], key: str) -> str:
    paper = (row["paper"] or {}).get(key)
    return _d(row[key], paper) if comparable(row) else "–"


def _method_label(row: Mapping[str, Any]) -> str:
    label = METHOD_NAMES.get(row["method"], row["method"])
    return f"{label} ({row['setting']})" if row["setting"] else label


def markdown(rows: Sequence[Mapping[str, Any]], paper: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: results vs the paper; random-weight runs apart and flagged; the paper's table."""
    real = [r for r in rows if not r["random"]]
    rand = [r for r in rows if r["random"]]
    out = ["## Results vs the paper", ""]
    if real:
        out += [
            "| dataset | method | eval res | backbone | images | ACC | paper ACC | Δ ACC "
            "| mIoU | paper mIoU | Δ mIoU | run |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in real:
            out.append(
                f"| {DATASET_NAMES.get(r['dataset'], r['dataset'])} | {_method_label(r)} "
                f"| {r['resolution']} | {r['backbone']} | {_images(r)} "
                f"| {_f(r['acc'])} | {_paper(r, 'acc')} | {_delta(r, 'acc')} "
                f"| {_f(r['miou'])} | {_paper(r, 'miou')} | {_delta(r, 'miou')} "
                f"| `{r['path']}` |"
            )
        out += ["", "Δ = this run minus the paper; – where the paper has no such setting."]
        if any(not comparable(r) for r in real):
            out.append(
                "Runs marked partial or with a subset (limit, curated=false, ids_file) are not "
                "the full benchmark: no Δ, they are not comparable to the paper."
            )
        out += _notes(real)
    else:
        out.append("No run with trained weights found.")
    if rand:
        out += [
            "",
            f"## ⚠ {RANDOM_MARK}: pipeline checks, NOT results",
            "",
            "These runs used a backbone with random weights (tests, smoke runs, compute "
            "measurements). Their numbers say nothing about any method and are not compared with "
            "the paper.",
            "",
            "| dataset | method | eval res | backbone | images | ACC | mIoU | run |",
            "|---|---|---:|---|---:|---:|---:|---|",
        ]
        for r in rand:
            out.append(
                f"| {DATASET_NAMES.get(r['dataset'], r['dataset'])} | {_method_label(r)} "
                f"| {r['resolution']} | {r['backbone'].replace(f' ({RANDOM_MARK})', '')} ⚠ {RANDOM_MARK} | {_images(r)} "
                f"| {_f(r['acc'])} | {_f(r['miou'])} | `{r['path']}` |"
            )
    out += [
        "",
        "## The paper's numbers",
        "",
        "| dataset | method | ACC | mIoU |",
        "|---|---|---:|---:|",
    ]
    for p in paper:
        out.append(
            f"| {DATASET_NAMES.get(p['dataset'], p['dataset'])} | {p['label']} "
            f"| {_f(p['acc'])} | {_f(p['miou'])} |"
        )
    out += ["", f"Rows no paper has ({NO_PAPER}): {NEW_ROWS}."]
    return "\n".join(out) + "\n"


def _notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The notes under the results table for MM-DiT rows: what "no paper number" and a paper
    row's status mean, and why a Seg4Diff run may have no paper number beside it."""
    notes = []
    if any(r.get("no_paper") for r in rows):
        notes.append(f"{NO_PAPER}: {NEW_ROWS} are rows no paper has.")
    statuses = sorted({r["paper"]["status"] for r in rows if (r["paper"] or {}).get("status")})
    if statuses:
        notes.append(
            f"Paper numbers marked {', '.join(statuses)}: see the source notes in "
            "experiments/paper_numbers.json (Seg4Diff's come from a third-party summary)."
        )
    if any(r["method"] == "seg4diff" and r["paper"] is None for r in rows):
        notes.append(
            "Seg4Diff's paper numbers (UNCONFIRMED) are compared only with runs under the "
            "release's protocol (`preprocessing=seg4diff` at resolution 640, what "
            "`method=seg4diff` runs; docs/seg4diff.md): other Seg4Diff runs have none beside them."
        )
    return notes


def _tex(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("Δ", r"$\Delta$"),
    ):
        s = s.replace(a, b)
    return s


def latex(rows: Sequence[Mapping[str, Any]]) -> str:
    """A booktabs table of the trained-weight runs (random-weight runs are left out)."""
    real = [r for r in rows if not r["random"]]
    n_rand = len(rows) - len(real)
    out = [
        "% Generated by experiments/make_tables.py; Delta = this run minus the paper, for "
        "complete runs on the full benchmark only.",
    ]
    if n_rand:
        out.append(f"% {n_rand} run(s) on RANDOM WEIGHTS left out: they are not results.")
    out += [
        r"\begin{tabular}{llrrrrrrr}",
        r"\toprule",
        r"Dataset & Method & Res. & ACC & Paper & $\Delta$ & mIoU & Paper & $\Delta$ \\",
        r"\midrule",
    ]
    for r in real:
        method = _method_label(r) + (r" (partial)" if r["partial"] else "")
        method += f" ({r['subset']})" if r["subset"] else ""
        cells = [
            DATASET_NAMES.get(r["dataset"], r["dataset"]),
            method,
            str(r["resolution"]),
            _f(r["acc"]),
            _paper(r, "acc"),
            _delta(r, "acc"),
            _f(r["miou"]),
            _paper(r, "miou"),
            _delta(r, "miou"),
        ]
        out.append(" & ".join(_tex(c).replace("–", "--") for c in cells) + r" \\")
    if not real:
        out.append(r"\multicolumn{9}{c}{no run with trained weights} \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dirs", nargs="+", help="run dirs or folders holding them (searched recursively)"
    )
    parser.add_argument("--out", type=Path, help="also write tables.md and tables.tex here")
    parser.add_argument("--paper", type=Path, default=PAPER_FILE, help="paper numbers JSON")
    args = parser.parse_args(argv)
    existing = [d for d in args.dirs if Path(d).exists()]
    for d in args.dirs:
        if not Path(d).exists():
            print(f"note: {d} does not exist, skipped", file=sys.stderr)
    paper = load_paper(args.paper)
    rows = collect(existing, paper)
    if not rows:
        print(
            f"no results.json with metrics under {', '.join(args.dirs)}: run an evaluation first, "
            "e.g. `python run.py experiment=coco_table1_diffseg_512`",
            file=sys.stderr,
        )
        return 1
    md = markdown(rows, paper)
    print(md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tables.md").write_text(md, encoding="utf-8")
        (args.out / "tables.tex").write_text(latex(rows), encoding="utf-8")
        print(f"wrote {args.out / 'tables.md'} and {args.out / 'tables.tex'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
