"""A page to try the methods on a photo: ``python app.py`` (Gradio; ``pip install -e .[app]``).

    python app.py                          # SD v1.4 (downloads it once), http://127.0.0.1:7860
    python app.py --backbone tiny          # offline, random weights: shapes only
    python app.py --host 0.0.0.0 --port 8080 --share

Upload a photo or pick a sample, choose the method and the backbone, move the method's main
parameters and press Segment: the overlay, the label map, the number of segments and the time
per stage, and the label PNG to download. "Compare" runs several methods on the same photo,
sharing the feature pass where their requests agree. Everything is computed by
:class:`diffseg.Segmenter`; a mistake (no weights, a bad image) is a message on the page.

In a Hugging Face Space (SDK gradio) this file is the ``app_file``: see README.md, "The demo
page".
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: offline use

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffseg.errors import RunError  # noqa: E402
from diffseg.overlay import colorize, save_segments_png  # noqa: E402
from diffseg.predictor import (  # noqa: E402
    Segmenter,
    available_backbones,
    available_methods,
    compose_config,
    method_params,
    segment_together,
)

log = logging.getLogger("diffseg.app")

SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"
RANDOM_BANNER = (
    "⚠️ **random weights: shapes only** — this backbone has random weights; its segments are "
    "meaningless (a check of the code path, not of the method)."
)
#: The page's controls of method parameters: (key, label, kind, min, max, step). A method gets
#: the controls whose key is one of its parameters (or hints, K-Means-S's num_classes).
CONTROLS = [
    ("kl_threshold", "KL threshold (DiffSeg)", "slider", 0.1, 2.0, 0.05),
    ("num_points", "anchor points per side (DiffSeg)", "slider", 2, 32, 1),
    ("tau", "tau (DiffCut)", "slider", 0.05, 1.0, 0.05),
    ("alpha", "alpha (DiffCut)", "slider", 1, 20, 1),
    ("refine", "refinement (DiffCut: PAMR, DiffSeg: K-Means)", "checkbox", None, None, None),
    ("num_clusters", "clusters (K-Means)", "slider", 2, 20, 1),
]
HINT_CONTROL = {"num_classes": "num_clusters"}  # K-Means-S's per-image count uses the slider


class Models:
    """Loaded segmenters, one backbone per name shared by every method (loaded once)."""

    def __init__(self, overrides: list[str], crop: str = "center") -> None:
        self.overrides = overrides
        self.backbones: dict[str, Any] = {}
        self.segmenters: dict[tuple[str, str, str], Segmenter] = {}
        self.lock = threading.Lock()

    def get(self, method: str, backbone: str, crop: str, progress=None) -> Segmenter:
        key = (method, backbone, crop)
        with self.lock:
            if key not in self.segmenters:
                if progress is not None and backbone not in self.backbones:
                    progress(0.1, desc=f"loading backbone {backbone} (first use only)...")
                seg = Segmenter(
                    method,
                    backbone,
                    crop=crop,
                    overrides=self.overrides,
                    model=self.backbones.get(backbone),
                )
                self.backbones.setdefault(backbone, seg.model)
                self.segmenters[key] = seg
            return self.segmenters[key]


def defaults_for(method: str, backbone: str, overrides: list[str]) -> tuple[dict[str, Any], bool]:
    """The method's parameters on this backbone and whether its weights are random (from the
    config, no model loaded)."""
    from diffseg.engine.config import plain
    from diffseg.tasks.build import is_random_config

    cfg = compose_config(method, backbone, overrides)
    params = {k: v for k, v in method_params(cfg).items() if not k.startswith("_")}
    return params, is_random_config(plain(cfg.backbone))


def _hint_defaults(method: str) -> dict[str, Any]:
    """Starting values of the controls that feed a method's hints (K-Means-S: its clusters)."""
    return {"num_clusters": 6} if method == "kmeans_s" else {}


def _shown(value: Any) -> bool:
    """A control is shown for a parameter with one value (not a list, e.g. per-iteration)."""
    return value is not None and not isinstance(value, list)


def params_from_controls(seg: Segmenter, values: dict[str, Any]) -> dict[str, Any]:
    """The per-call parameters of ``seg`` from the page's controls."""
    known = seg.parameters()
    out = {k: v for k, v in values.items() if k in known and isinstance(known[k], int | float)}
    for key, value in values.items():  # ints stay ints (num_points, num_clusters)
        if key in out and isinstance(known[key], int) and not isinstance(known[key], bool):
            out[key] = int(value)
    for hint in seg.hints:
        out[hint] = int(values[HINT_CONTROL.get(hint, hint)])
    return out


def photo_source(upload: str | None, sample: str | None) -> str:
    if upload:
        return upload
    if sample:
        return str(SAMPLES / sample)
    raise RunError("no photo: upload one or pick a sample")


def label_png(result) -> str:
    folder = Path(tempfile.mkdtemp(prefix="diffseg_app_"))
    path = folder / "labels.png"
    save_segments_png(path, result.labels, result.metadata(), result.random_weights)
    return str(path)


def info_text(result) -> str:
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    random = " — **random weights: shapes only**" if result.random_weights else ""
    return (
        f"**{result.num_segments} segments** · {result.method} on {result.backbone}"
        f"{random}  \ntime per stage: {stages}"
    )


def error_text(err: BaseException) -> str:
    """A page message: the user's mistake as is; anything else named, its traceback logged."""
    if isinstance(err, RunError | gr.Error):
        return f"**error:** {err}"
    log.error("unexpected error:\n%s", traceback.format_exc())
    return f"**error:** {type(err).__name__}: {err} (details in the server's log)"


def build_app(
    backbone: str = "sd14", overrides: list[str] | None = None, method: str = "diffseg"
) -> gr.Blocks:
    """The page. ``overrides``: ``run.py`` overrides for every segmenter (``image_size=256``)."""
    overrides = list(overrides or [])
    models = Models(overrides)
    methods = available_methods()
    samples = sorted(p.name for p in SAMPLES.glob("*.jpg"))
    start, random_start = defaults_for(method, backbone, overrides)
    start = {**_hint_defaults(method), **start}

    with gr.Blocks(title="diffseg: training-free segmentation") as page:
        gr.Markdown(
            "# diffseg\nTraining-free segmentation from Stable Diffusion's attention "
            "(DiffSeg, DiffCut, K-Means baselines). Upload a photo or pick a sample, then "
            "**Segment**."
        )
        banner = gr.Markdown(RANDOM_BANNER, visible=random_start, elem_id="banner")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Photo (upload)",
                    type="filepath",
                    elem_id="photo",
                    file_types=[".jpg", ".jpeg", ".png", ".webp"],
                )
                sample = gr.Dropdown(
                    samples,
                    value=samples[0] if samples else None,
                    label="or a sample (assets/samples)",
                    elem_id="sample",
                )
                method = gr.Dropdown(methods, value=method, label="method", elem_id="method")
                bb = gr.Dropdown(
                    available_backbones(), value=backbone, label="backbone", elem_id="backbone"
                )
                crop = gr.Radio(["center", "pad", "resize"], value="center", label="crop")
                controls = {}
                for key, label, kind, lo, hi, step in CONTROLS:
                    value, shown = start.get(key), _shown(start.get(key))
                    if kind == "slider":
                        controls[key] = gr.Slider(
                            lo, hi, value=value, step=step, label=label, elem_id=key, visible=shown
                        )
                    else:
                        controls[key] = gr.Checkbox(
                            value=bool(value), label=label, elem_id=key, visible=shown
                        )
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                with gr.Tab("Segment"):
                    overlay = gr.Image(label="overlay", type="pil", format="png", elem_id="overlay")
                    labels = gr.Image(label="label map", type="pil", format="png", elem_id="labels")
                    info = gr.Markdown("", elem_id="info")
                    download = gr.File(label="label PNG (segment ids)", elem_id="download")
                with gr.Tab("Compare"):
                    chosen = gr.CheckboxGroup(
                        methods,
                        value=["diffseg", "kmeans_c"],
                        label="methods",
                        elem_id="compare_methods",
                    )
                    compare = gr.Button("Compare", elem_id="compare")
                    gallery = gr.Gallery(label="overlays", columns=1, elem_id="gallery")
                    table = gr.Markdown("", elem_id="compare_info")

        keys = list(controls)

        def refresh(method_name, backbone_name):
            """Show the controls of the method, at its defaults on this backbone."""
            try:
                params, random = defaults_for(method_name, backbone_name, overrides)
            except Exception as err:  # noqa: BLE001 - a message on the page, never a traceback
                return [gr.update() for _ in keys] + [error_text(err), gr.update()]
            params = {**_hint_defaults(method_name), **params}
            updates = []
            for key in keys:
                value = params.get(key)
                shown = _shown(value)
                updates.append(
                    gr.update(visible=shown, value=value) if shown else gr.update(visible=False)
                )
            return updates + ["", gr.update(visible=random)]

        def segment(
            upload_path,
            sample_name,
            method_name,
            backbone_name,
            crop_mode,
            *values,
            progress=gr.Progress(),  # noqa: B008
        ):
            empty = (None, None, "", None)
            try:
                seg = models.get(method_name, backbone_name, crop_mode, progress)
                progress(0.6, desc="segmenting...")
                params = params_from_controls(seg, dict(zip(keys, values, strict=True)))
                result = seg(photo_source(upload_path, sample_name), **params)
            except Exception as err:  # noqa: BLE001
                return (*empty, error_text(err), gr.update())
            label_map = Image.fromarray(colorize(result.labels))
            return (
                result.overlay(),
                label_map,
                info_text(result),
                label_png(result),
                "",
                gr.update(visible=result.random_weights),
            )

        def compare_methods(
            upload_path,
            sample_name,
            names,
            backbone_name,
            crop_mode,
            *values,
            progress=gr.Progress(),  # noqa: B008
        ):
            try:
                if len(names or []) < 2:
                    raise RunError("choose two or more methods to compare")
                segs = [models.get(n, backbone_name, crop_mode, progress) for n in names]
                progress(0.6, desc="segmenting...")
                controls_now = dict(zip(keys, values, strict=True))
                jobs = [(s, params_from_controls(s, controls_now)) for s in segs]
                source = photo_source(upload_path, sample_name)
                results = [r[0] for r in segment_together([source], jobs)]
            except Exception as err:  # noqa: BLE001
                return [], "", error_text(err)
            shared = len({(id(s.model), s.image_size, s.crop) for s in segs})
            rows = [
                f"| {r.method} | {r.num_segments} | {r.timings['method'] * 1000:.0f} ms |"
                for r in results
            ]
            text = "\n".join(
                [
                    "| method | segments | method time |",
                    "|---|---|---|",
                    *rows,
                    f"\n{shared} feature pass group(s) for {len(results)} methods",
                ]
            )
            items = [
                (np.asarray(r.overlay()), f"{r.method}: {r.num_segments} segments") for r in results
            ]
            return items, text, ""

        inputs = [upload, sample, method, bb, crop, *controls.values()]
        for trigger in (method.change, bb.change):
            trigger(refresh, [method, bb], [*controls.values(), status, banner])
        run.click(segment, inputs, [overlay, labels, info, download, status, banner])
        compare.click(
            compare_methods,
            [upload, sample, chosen, bb, crop, *controls.values()],
            [gallery, table, status],
        )
    return page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="diffseg's demo page (Gradio)")
    parser.add_argument(
        "--backbone",
        default=os.environ.get("DIFFSEG_BACKBONE", "sd14"),
        help="backbone shown first (tiny: offline, random weights)",
    )
    parser.add_argument("--method", default="diffseg", help="method shown first")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="model input side for every method (smaller: faster on a CPU)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="evaluation size of the predictions for every method",
    )
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace, overrides: list[str]) -> None:
    """A mistake on the command line: one ``error:`` line and exit status 2."""
    import sys

    from diffseg.engine.config import check_config

    for flag, value, known in (
        ("--backbone", args.backbone, available_backbones()),
        ("--method", args.method, available_methods()),
    ):
        if value not in known:
            print(f"error: {flag} {value} is unknown; choose one of {', '.join(known)}",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
    try:
        check_config(compose_config(args.method, args.backbone, overrides))
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = [f"image_size={args.image_size}"] if args.image_size else []
    overrides += [f"resolution={args.resolution}"] if args.resolution else []
    _check_args(args, overrides)
    page = build_app(args.backbone, overrides, args.method)
    page.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=[str(SAMPLES)],
    )


if __name__ == "__main__":
    main()
