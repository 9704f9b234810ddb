"""napari finds the plugin manifest from the installed package, editable or wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_found_through_the_entry_point():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-densemp")
    assert manifest.name == "napari-densemp"
    assert manifest.display_name


def test_napari_finds_our_reader_writer_samples_and_widget(tmp_path):
    """What File > Open, Save, Open Sample and the Plugins menu ask npe2 for."""
    import numpy as np
    from npe2 import PluginManager

    from napari_densemp.io import write_nifti

    manager = PluginManager.instance()
    manager.discover()
    scan = tmp_path / "scan.nii.gz"
    write_nifti(scan, np.zeros((4, 5, 6), np.float32), np.eye(4))
    readers = [r.plugin_name for r in manager.iter_compatible_readers([str(scan)])]
    assert "napari-densemp" in readers
    writers = [w.plugin_name for w in manager.iter_compatible_writers(["labels"])]
    assert "napari-densemp" in writers
    contributions = manager.get_manifest("napari-densemp").contributions
    assert {s.key for s in contributions.sample_data} == {"phantom_ct", "mni152_t1"}
    assert [w.display_name for w in contributions.widgets] == ["One-shot segment"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("napari_densemp-*.whl")
    return path


@pytest.mark.slow
def test_wheel_carries_manifest_model_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read("napari_densemp/napari.yaml").decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert manifest == (ROOT / "napari.yaml").read_text()  # one source of truth, shipped as a file
    assert {f"napari_densemp/models/default_{name}.pt" for name in ("v0", "v2", "v3")} <= names
    assert "napari_densemp/models/MODEL_CARD.md" in names
    assert {"training/cli.py", "src_data/phantoms.py"} <= names
    assert "napari-densemp = napari_densemp:napari.yaml" in entry_points
    assert "densemp-segment = napari_densemp.cli:main" in entry_points
    assert "densemp-train = training.cli:main" in entry_points


@pytest.mark.slow
def test_npe2_reads_the_manifest_from_an_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]);"
             "from npe2 import PluginManifest; import napari_densemp;"
             "m = PluginManifest.from_distribution('napari-densemp');"
             "print(m.name); print(napari_densemp.__file__)")
    out = subprocess.run([sys.executable, "-c", probe, str(target)], check=True, capture_output=True, text=True)
    name, module_file = out.stdout.split()
    assert name == "napari-densemp"
    assert Path(module_file).is_relative_to(target)


def test_library_and_clis_import_without_qt_or_napari():
    probe = ("import sys; import napari_densemp.engine, napari_densemp.cli, training.cli, training.stage2;"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in"
             " {'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'superqt'}))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_code_is_ruff_clean():
    ruff = pytest.importorskip("ruff")
    del ruff
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
