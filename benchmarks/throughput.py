"""Data-pipeline throughput: stage-2 episodes/s and stage-1 view pairs/s per CPU core.

    python benchmarks/throughput.py                    # phantoms
    python benchmarks/throughput.py --data ../shared/data/chaos_t2 --workers 2

One core: the pipeline in this process with one torch thread (what one DataLoader worker
does). With --workers N the DataLoader's N background processes feed this one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_densemp.preprocessing import PreprocessingProfile
from src_data.datasets import find_scans, prepare_scan
from src_data.phantoms import write_cohort
from training.episodes import SuperpixelEpisodes
from training.finetune import FinetuneEpisodes
from training.stage1 import ContrastiveViews


def rate(dataset, count: int, workers: int, batch: int = 8) -> float:
    if workers == 0:
        start = time.perf_counter()
        for i in range(count):
            dataset[i]
        return count / (time.perf_counter() - start)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=range(count + 4 * workers * batch),
                                         num_workers=workers)
    stream = iter(loader)
    for _ in range(workers):  # workers started and warm
        next(stream)
    start = time.perf_counter()
    for _ in range(count // batch):
        next(stream)
    return (count // batch) * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of scans (default: 2 CT + 2 MRI phantoms)")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = args.data or Path(tempfile.mkdtemp(prefix="densemp-throughput-"))
    if args.data is None:
        write_cohort(folder, 2, "ct", first_seed=300)
        write_cohort(folder, 2, "mri", first_seed=400)
    records = find_scans(folder)[:6]
    cache = Path(tempfile.mkdtemp(prefix="densemp-prepared-"))
    scans = [prepare_scan(r, PreprocessingProfile(), cache) for r in records]
    images = [r.image for r in records]
    print(f"{len(scans)} scans from {folder}; {args.count} items; workers {args.workers}; 1 torch thread each")
    rows = [("stage 2 episodes (256 crop)", SuperpixelEpisodes(scans, crop=256, seed=0)),
            ("fine-tuning episodes (p 0.25 labelled)", FinetuneEpisodes(scans, crop=256, seed=0)
             if all(s.label is not None for s in scans) else None),
            ("stage 1 view pairs (224)", ContrastiveViews(images, size=224, seed=0, cache_dir=cache / "views"))]
    for name, dataset in rows:
        if dataset is None:
            continue
        per_second = rate(dataset, args.count, args.workers)
        cores = max(args.workers, 1)
        print(f"{name:<42}{per_second:8.1f}/s  {per_second / cores:8.1f}/s per core")
    return 0 if np.isfinite(per_second) else 1


if __name__ == "__main__":
    sys.exit(main())
