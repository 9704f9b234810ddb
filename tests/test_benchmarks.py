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


@pytest.mark.slow
def test_bundled_model_finds_the_brain_of_real_mri_it_never_saw(capsys):
    """nilearn's MNI152 T1: an anatomy and contrast outside every training set, with tissue maps
    as the truth. One painted axial slice must give the brain, well above copying the slice."""
    pytest.importorskip("nilearn")
    import accuracy

    assert accuracy.main(["--mni152", "--device", "cpu"]) == 0
    rows = {line.split()[0]: [float(v) for v in line.split()[1:4]]
            for line in capsys.readouterr().out.split("(mean 3D Dice over scans)")[1].strip().splitlines()}
    assert set(rows) == {"brain", "grey", "white", "mean"}
    propagated, copy_all, copy_z = rows["brain"]
    assert propagated > 85 and propagated > copy_z + 10 and copy_z > copy_all
