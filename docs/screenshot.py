"""Screenshot of napari with the "One-shot segment" widget after a propagation.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot.py   # writes docs/widget.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np

OUT = Path(__file__).with_name("widget.png")


def main(out: Path = OUT) -> int:
    viewer = napari.Viewer(title="napari-densemp")
    viewer.window._qt_window.resize(1500, 1000)
    viewer.open_sample("napari-densemp", "phantom_ct")
    _, widget = viewer.window.add_plugin_dock_widget("napari-densemp", "One-shot segment")
    widget.run()
    widget.wait()
    result = next(layer for layer in viewer.layers if "propagated" in layer.name)
    z = int(np.flatnonzero(result.data.any(axis=(1, 2)))[-4])  # a slice far from the painted one
    viewer.dims.set_current_step(0, z)
    napari.qt.get_qapp().processEvents()
    viewer.window.screenshot(str(out), canvas_only=False)
    print(f"{out}: slice {z}; {widget._status.value}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
