"""Write a run's results from the records its processes left: ``python -m diffseg.tasks.merge
RUN_DIR``. For independent shard jobs (``num_shards=N shard_index=i``, e.g. a Slurm array)
that had no process group to merge at the end; harmless on any run dir (it segments nothing)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import RunError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffseg.tasks.merge", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config_resolved.yaml)")
    args = parser.parse_args(argv)
    config = args.run_dir / "config_resolved.yaml"
    if not config.is_file():
        print(f"error: {config} does not exist: {args.run_dir} is not a run directory "
              "(or no shard has started yet)", file=sys.stderr)  # fmt: skip
        return 2
    cfg = OmegaConf.load(config)
    if "protocol" not in cfg:  # written before methods owned their defaults (configs changed)
        print(f"error: {args.run_dir} was written by an older diffseg (its config_resolved.yaml "
              "has no protocol): merge it with that version, or run the command again (run.py "
              "resumes it) before merging", file=sys.stderr)  # fmt: skip
        return 2
    cfg.num_shards, cfg.shard_index = 1, 0  # the merge is one process over every record
    from .evaluate import evaluate

    try:
        out = evaluate(cfg, args.run_dir, merge_only=True)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    incomplete = [name or "-" for name, r in out["results"].items() if not r["complete"]]
    if incomplete:
        print(f"note: not every image is done yet ({', '.join(incomplete)}); the results are "
              "partial. Run the missing shards again and merge once more.", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
