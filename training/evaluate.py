"""The paper's evaluation protocol and, always beside it, the oracle-free one.

Folds: 5 over the numerically sorted scans (boundaries [0, 6, 12, 18, 24, 30] for the 30 CT
scans, [0, 4, 8, 12, 16, 20] for the 20 MR scans, equal parts for other counts); the support
is the scan after the fold (circular). Paper protocol: 3 supports at 1/6, 1/2, 5/6 of the
support's organ slices, each query slice of the true organ extent (an oracle) segmented with
its chunk's support, only those slices scored. Oracle-free: the whole query volume through
:func:`napari_densemp.engine.segment_like` with the support's 3D mask, the whole volume
scored. Dice = 2TP / (2TP + FP + FN) over a scan, averaged over scans, then folds.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from napari_densemp.atomic import write_atomically
from napari_densemp.engine import FeatureCache, Model, segment_like
from src_data.datasets import ScanRecord, find_scans, load_scan

from .protocol import paper_protocol_mask

FOLD_BOUNDARIES = {30: [0, 6, 12, 18, 24, 30], 20: [0, 4, 8, 12, 16, 20]}
# Label groups: setting 2 trains on one group and tests on the other.
LABEL_GROUPS = {"ct": {"upper": (1, 6), "lower": (2, 3)},  # Synapse: spleen, liver | kidneys
                "mri": {"upper": (4, 1), "lower": (3, 2)}}  # CHAOS: spleen, liver | kidneys
ORGAN_NAMES = {"ct": {1: "spleen", 2: "right kidney", 3: "left kidney", 6: "liver"},
               "mri": {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}}


@dataclass
class Row:
    fold: int
    scan: str
    support: str
    organ: int
    paper: float
    oracle_free: float


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else 1.0


def make_folds(records: list[ScanRecord], count: int = 5) -> list[tuple[list[ScanRecord], ScanRecord]]:
    """(test scans, support scan) per fold."""
    n = len(records)
    bounds = FOLD_BOUNDARIES.get(n) if count == 5 else None
    bounds = bounds or [round(b) for b in np.linspace(0, n, count + 1)]
    return [(records[a:b], records[b % n]) for a, b in itertools.pairwise(bounds) if b > a]


def evaluate(data_dir: str | Path, model_for: Callable[[int], Model], organs: list[int],
             folds: int = 5, progress: bool = True) -> list[Row]:
    """Both protocols over every fold; ``model_for(fold)`` gives the fold's model."""
    records = [r for r in find_scans(data_dir) if r.label is not None]
    rows = []
    splits = make_folds(records, folds)
    bar = tqdm(total=sum(len(test) for test, _ in splits), desc="evaluating", unit="scan", disable=not progress)
    for k, (test, support_record) in enumerate(splits):
        model, cache = model_for(k), FeatureCache(max_volumes=3)
        support = load_scan(support_record)
        for record in test:
            query = load_scan(record)
            for organ in organs:
                truth, support_truth = query.label == organ, support.label == organ
                if not truth.any() or not support_truth.any():
                    continue
                affines = dict(support_affine=support.affine, query_affine=query.affine)
                paper = paper_protocol_mask(model, support.volume, support_truth, query.volume, truth,
                                            support.spacing, query.spacing, cache=cache, **affines)
                free = segment_like(support.volume, support_truth.astype(np.uint8), query.volume, model,
                                    support.spacing, query.spacing, cache=cache, **affines).mask
                rows.append(Row(k, record.name, support_record.name, organ, dice(paper, truth), dice(free, truth)))
            bar.update()
    bar.close()
    return rows


def summary(rows: list[Row]) -> dict[int, tuple[float, float]]:
    """Per organ: mean over each fold's scans, then over folds (paper, oracle-free)."""
    out = {}
    for organ in sorted({r.organ for r in rows}):
        per_fold = [np.mean([[r.paper, r.oracle_free] for r in rows if r.organ == organ and r.fold == k], axis=0)
                    for k in sorted({r.fold for r in rows if r.organ == organ})]
        out[organ] = tuple(float(v) for v in np.mean(per_fold, axis=0))
    return out


def markdown_table(rows: list[Row], names: dict[int, str], title: str) -> str:
    table = summary(rows)
    organs = list(table)
    head = "| protocol | " + " | ".join(names.get(o, str(o)) for o in organs) + " | mean |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(organs) + 2)]
    for i, name in enumerate(["paper (true z-range, oracle)", "oracle-free (whole volume)"]):
        values = [100 * table[o][i] for o in organs]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |")
    return "\n".join(lines) + "\n"


def write_reports(rows: list[Row], out_dir: Path, names: dict[int, str], title: str) -> tuple[Path, Path, Path]:
    """table.md, table.csv (per organ and mean) and scans.csv (per scan), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary(rows)
    summary_csv = _io.StringIO()
    writer = csv.writer(summary_csv)
    writer.writerow(["organ", "name", "paper_dice", "oracle_free_dice"])
    for organ, (paper, free) in table.items():
        writer.writerow([organ, names.get(organ, ""), f"{100 * paper:.2f}", f"{100 * free:.2f}"])
    means = np.mean(list(table.values()), axis=0)
    writer.writerow(["mean", "", f"{100 * means[0]:.2f}", f"{100 * means[1]:.2f}"])
    scans_csv = _io.StringIO()
    writer = csv.DictWriter(scans_csv, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    paths = []
    for name, text in (("table.md", markdown_table(rows, names, title)), ("table.csv", summary_csv.getvalue()),
                       ("scans.csv", scans_csv.getvalue())):
        paths.append(write_atomically(out_dir / name, lambda tmp, t=text: Path(tmp).write_text(t), suffix=".tmp"))
    return tuple(paths)
