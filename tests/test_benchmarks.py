"""The figure script users see in README: one phantom, two organs, colours where they belong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src_data.phantoms import write_cohort

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.slow
def test_figure_shows_the_painting_the_truth_and_the_propagated_mask(tmp_path, capsys):
    import figure

    write_cohort(tmp_path / "data", 1, "ct", first_seed=40)
    out = tmp_path / "figure.png"
    assert figure.main(["--data", str(tmp_path / "data"), "--scans", "phantom_ct_40", "--organs", "6", "99",
                        "--names", "liver", "--columns", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "organ 99 absent" in printed.err
    dice = float(printed.out.split("3D Dice ")[1].split()[0])
    assert dice > 70  # the liver of a phantom, as the engine tests find it
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    for colour in figure.COLOURS.values():
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) == 0).sum() > 50, colour
    width, height = Image.open(out).size
    assert width >= 5 * figure.TILE and height < 2 * (figure.TILE + 40)  # 1 painted + 4 slices, one row
