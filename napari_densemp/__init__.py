"""napari-densemp: one-shot segmentation of CT and MRI volumes with DenseMP.

Paint a structure on one slice; the engine propagates it through the volume, or finds and
segments it in other scans. The library is plain Python (no Qt); napari and the
``densemp-segment`` CLI are thin shells over :mod:`napari_densemp.engine`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-densemp")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

from .errors import DenseMPError

__all__ = ["DenseMPError", "__version__"]
