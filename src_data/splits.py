"""The project's one split of the shared real scans into seen and never-seen patients.

The default model trains on neither labels nor images of the held-out patients; the
benchmarks score exactly those: CHAOS patients 31-39 and the last 10 OpenKBP patients.
"""

from __future__ import annotations

from pathlib import Path

from .datasets import ScanRecord, find_scans

CHAOS_HELD_OUT = frozenset({31, 32, 33, 34, 36, 37, 38, 39})
OPENKBP_HELD_OUT_COUNT = 10


def split_scans(data_dir: str | Path) -> tuple[list[ScanRecord], list[ScanRecord]]:
    """(seen, held_out) scans of a data folder; other folders are all 'seen'."""
    scans = find_scans(data_dir)
    if any(s.name.startswith("pt_") for s in scans):
        cut = len(scans) - OPENKBP_HELD_OUT_COUNT
        return scans[:cut], scans[cut:]
    if any(s.name.startswith("image_") for s in scans):
        held = [s for s in scans if s.patient_number in CHAOS_HELD_OUT]
        return [s for s in scans if s not in held], held
    return scans, []
