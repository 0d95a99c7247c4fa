"""End-to-end speed of the evaluation pipeline, per stage: images/s at several batch sizes and
precisions, for DiffSeg and DiffCut, through the engine's own loop and evaluators.

    python benchmarks/pipeline.py                      # CUDA when present, else the CPU
    python benchmarks/pipeline.py --batches 1 4 8 16 --dtypes float32 float16 --images 64
    python benchmarks/pipeline.py --device cpu --batches 1 --images 1 --image-size 128 \
        --resolution 32 --workers 0                    # smoke run (tiny models, seconds)

On CUDA the backbones have the real shapes with RANDOM weights (DiffSeg: SD v1 at 512 px;
DiffCut: SDXL base at 1024 px, a little larger than SSD-1B); on the CPU the tiny models of the
same layouts. Images are random and labels synthetic: the figures are about compute, not about
segmentation quality. Each configuration prints images/s after a warm-up batch, the share of the
measured time each stage takes (data, features = VAE encode + UNet + capture, method, scoring and
writing), the VAE's share of the features stage, and the UNet FLOPs achieved against the device's
peak when ``--peak-tflops`` is given or the GPU is known.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from diffseg import DiffCut, DiffSeg, build_backbone
from diffseg.engine.evaluators import MetricEvaluator
from diffseg.engine.loop import STAGES, SettingRun, StageTimes, run_loop
from diffseg.engine.settings import Setting

#: Dense bf16/fp16 peak in TFLOP/s of GPUs this project is measured on (vendor figures, no
#: sparsity), keyed by a substring of ``torch.cuda.get_device_name``.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class RandomImages(Dataset):
    """``n`` random images (3, S, S) in [-1, 1] with blocky labels (R, R) of 27 classes."""

    def __init__(self, n: int, image_size: int, resolution: int) -> None:
        self.n, self.image_size, self.resolution = n, image_size, resolution

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.image_size, self.image_size, generator=g) * 2 - 1
        blocks = torch.randint(0, 27, (4, 4), generator=g)
        label = blocks.repeat_interleave(self.resolution // 4, 0).repeat_interleave(
            self.resolution // 4, 1
        )
        return {"image": image, "label": label, "id": f"{index:06d}"}


def unet_flops(backbone, method, image_size: int) -> float:
    """FLOPs of one image's feature pass (torch's flop counter; attention capture included)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(1, 3, image_size, image_size, device=backbone.device)
    counter = FlopCounterMode(display=False)
    with counter:
        backbone.extract(images, method.feature_request())
    return float(counter.get_total_flops())


def measure(
    backbone, method, batch: int, images: int, image_size: int, resolution: int, workers: int = 2
):
    """Run the engine's loop over random images; returns the stage times."""
    device = backbone.device
    data = RandomImages(images, image_size, resolution)
    loader = DataLoader(
        data, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    with tempfile.TemporaryDirectory() as tmp:
        setting = Setting(None, {}, {}, method, Path(tmp))
        records = MetricEvaluator(Path(tmp), data_ids(data), [str(c) for c in range(27)], True)
        records.reset()
        records.open()
        run = SettingRun(setting, [], records)
        times = StageTimes()
        run_loop(loader, backbone, [run], resolution, device, times=times,
                 overlap=device.type == "cuda")  # fmt: skip
        records.close()
    return times


def data_ids(data: RandomImages) -> list[str]:
    return [f"{i:06d}" for i in range(len(data))]


def encode_share(backbone, method, batch: int, image_size: int, repeats: int = 3) -> float:
    """The VAE encoder's share of a feature pass (encode alone against the whole extraction)."""
    images = torch.rand(batch, 3, image_size, image_size, device=backbone.device) * 2 - 1
    request = method.feature_request()
    backbone.extract(images, request)  # warm-up

    def best(fn) -> float:
        out = []
        for _ in range(repeats):
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return min(out)

    return best(lambda: backbone.encode(images)) / best(lambda: backbone.extract(images, request))


def report(name: str, batch: int, dtype, times: StageTimes, flops: float, peak: float | None):
    total = sum(times.seconds.values())
    if not times.images or total <= 0:  # only the warm-up batch ran: nothing was timed
        print(f"{name:<8} batch {batch:>2}: no timed batch (every image went to the warm-up)")
        return
    rate = times.images / total
    shares = " ".join(f"{k} {100 * times.seconds[k] / total:4.1f}%" for k in STAGES)
    line = f"{name:<8} batch {batch:>2} {str(dtype).replace('torch.', ''):<8} {rate:7.2f} img/s | {shares}"
    if peak:
        line += f" | UNet {flops * rate / 1e12:6.1f} TFLOP/s = {100 * flops * rate / 1e12 / peak:4.1f}% of peak"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None)
    parser.add_argument(
        "--images", type=int, default=None, help="timed images per setting (+ a warm-up batch)"
    )
    parser.add_argument("--methods", nargs="+", default=["diffseg", "diffcut"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side (default: 512 / 1024)"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="evaluation side (default: the protocol's)"
    )
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.error("--images must be >= 1 (timed images, after a warm-up batch)")
    cuda = args.device.startswith("cuda")
    batches = args.batches or ([1, 4, 8, 16] if cuda else [1, 2])
    dtypes = [
        getattr(torch, d)
        for d in (args.dtypes or (["float32", "float16"] if cuda else ["float32"]))
    ]
    peak = args.peak_tflops
    if cuda and peak is None:
        name = torch.cuda.get_device_name(args.device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        print(f"device: {name}; dense half-precision peak {peak} TFLOP/s")
    else:
        print(f"device: {args.device} ({torch.get_num_threads()} threads); RANDOM weights")
    plans = {
        "diffseg": ("sd14_random" if cuda else "tiny", DiffSeg(), 512, 512 if cuda else 64),
        "diffcut": ("sdxl_random" if cuda else "tiny_sdxl", DiffCut(), 1024, 128),
    }
    for name in args.methods:
        bb_name, method, image_size, resolution = plans[name]
        image_size = args.image_size or image_size
        resolution = args.resolution or resolution
        for dtype, batch in itertools.product(dtypes, batches):
            backbone = build_backbone(bb_name, device=args.device, dtype=dtype)
            flops = unet_flops(backbone, method, image_size) if peak else 0.0
            timed = args.images or max(2 * batch, 4 if cuda else 3)
            n = timed + batch  # + the warm-up batch
            t0 = time.perf_counter()
            times = measure(backbone, method, batch, n, image_size, resolution, args.workers)
            report(name, batch, dtype, times, flops, peak)
            share = encode_share(backbone, method, batch, image_size)
            print(f"         VAE encode: {100 * share:.0f}% of the features stage")
            del backbone
            if cuda:
                torch.cuda.empty_cache()
            print(f"         ({n} images, {time.perf_counter() - t0:.0f} s with loading)")


if __name__ == "__main__":
    main()
