"""The "One-shot segment" dock widget: a thin shell over :func:`napari_densemp.engine.propagate`.

It gathers the layers and options, runs the engine in a ``thread_worker`` (napari stays
responsive; progress and Cancel work), and puts the result into a labels layer that is never
the painted one. A re-run after a correction reuses the cached backbone features; each
propagation can be undone as a whole.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from qtpy.QtCore import QObject, Qt, Signal

from .errors import DenseMPError
from .io import Geometry, painting_on_image
from .napari_io import mask_metadata
from .painting import tiny_painting_tip

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)
DEFAULT_MODEL_CHOICE = "bundled default"
FILE_MODEL_CHOICE = "checkpoint file"
NEW_LAYER = "new layer"
CPU_INT8 = "cpu int8"  # the device choice that loads the model with precision="int8"
UNDO_DEPTH = 5
RESULT_KEY = "densemp_result"


def _digest(data: np.ndarray) -> str:
    """Tells whether a layer was edited since we wrote it, without keeping a copy."""
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=16).hexdigest()


class _Relay(QObject):
    """Carries progress from the worker thread to the widget (a queued Qt connection)."""

    progressed = Signal(int, int, int, str)  # run number, done, total, stage


@dataclass
class _Undo:
    layer: Any  # the napari Labels layer the propagation wrote to
    previous: np.ndarray | None  # its data before; None: the propagation created it


# What to paint: the engine takes the painting as the structure's appearance and edge (README).
PAINT_HINT = ("Paint the structure's whole cross-section (or its closed outline) on one slice, where it "
              "is large, then press Propagate.")

# The status line when a painted outline was filled (:func:`~napari_densemp.painting.filled_outlines`).
_OUTLINE_NOTE = ("\nThe painting is a closed outline: its inside was taken as the structure (untick "
                 "'fill painted outlines' to keep a ring).")


def _tips(request: _Request, labels: list[int], values: np.ndarray) -> list[str]:
    """Status lines naming a slice worth painting too (:func:`larger_slice_tip`), per structure."""
    from .painting import larger_slice_tip, painting_axis

    lines = []
    for label in labels:
        drawn = request.painted == label
        walked = painting_axis(drawn, default=request.axis) if request.axis_auto else request.axis
        tip = larger_slice_tip(values == label, drawn, walked)
        if tip:
            lines.append(f"\nTip{f' (label {label})' if len(labels) > 1 else ''}: {tip}")
    return lines


@dataclass
class _Request:
    """Everything a run needs, read from the widget on the main thread."""

    volume: np.ndarray
    painted: np.ndarray
    spacing: tuple[float, float, float]
    axis: int
    label: int | None
    model_source: str
    device: str
    between_painted_only: bool
    mirror_average: bool
    intensity_band: bool = True  # unticked: both intensity-band rules off (MRI voxels, CT stop)
    fill_outlines: bool = True  # unticked: a painted closed outline stays a ring
    modality: str = "auto"  # "auto", "ct" or "mri": how the scans' intensities are read
    axis_auto: bool = False  # each structure walked across the plane it was painted on (axis: the slider's)
    image_layer: Any = None
    geometry: Geometry | None = None  # the scan's stored grid, when the layer came from our reader
    targets: list | None = None  # segment_open_images: the other image layers
    scans: list | None = None  # segment_folder: the scan files
    results_dir: Path | None = None
    rtstruct: bool = False  # segment_folder: a DICOM series' result as an RT Structure Set, not a DICOM SEG

    def options(self, model, **rules):
        """The model's propagation rules with this request's choices (an unticked mirror box keeps
        the model's own setting; an unticked intensity or outline box turns that rule off)."""
        from .engine import INTENSITY_BAND_OFF

        return model.default_options(**rules, **({"mirror_average": True} if self.mirror_average else {}),
                                     **({} if self.intensity_band else INTENSITY_BAND_OFF),
                                     **({} if self.fill_outlines else {"fill_outlines": False}))

    def on_stored_grid(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], int, np.ndarray]:
        """Volume, painting, spacing, slicing axis and affine on the scan's stored grid: the engine
        then sees exactly what ``densemp-segment`` sees for the same file, and the widget gives
        the CLI's mask. A layer from another reader is taken as napari shows it (axes along
        world axes, spacing from its scale)."""
        if self.geometry is None or self.geometry.display_shape != self.volume.shape:
            return self.volume, self.painted, self.spacing, self.axis, np.diag([*self.spacing, 1.0])
        stored_axis = int(np.flatnonzero(self.geometry.to_display[:, 0] == self.axis)[0])
        return (self.geometry.stored(self.volume), self.geometry.stored(self.painted),
                self.geometry.stored_spacing, stored_axis, self.geometry.affine)

    def display_voxel(self, axis: int, voxel: tuple[int, int, int]) -> tuple[int, tuple[int, int, int]]:
        """An axis and a voxel of the stored grid as napari shows them."""
        if self.geometry is None or self.geometry.display_shape != self.volume.shape:
            return axis, voxel
        return int(self.geometry.to_display[axis][0]), self.geometry.display_index(voxel)

    def to_display(self, mask: np.ndarray, per_slice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The engine's mask and per-slice values back on the display grid."""
        if self.geometry is None or self.geometry.display_shape != self.volume.shape:
            return mask, per_slice
        stored_axis = int(np.flatnonzero(self.geometry.to_display[:, 0] == self.axis)[0])
        flipped = self.geometry.to_display[stored_axis, 1] < 0
        return self.geometry.display(mask), per_slice[::-1] if flipped else per_slice


class OneShotWidget(Container):
    """Paint a structure on one slice, press Propagate, get it through the volume."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = viewer
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._painted = create_widget(annotation="napari.layers.Labels", label="painted")
        self._new_painting = PushButton(text="New painting layer",
                                        tooltip="An empty labels layer on the image's grid, ready to paint "
                                                "with label 1.")
        self._label = SpinBox(value=0, min=0, max=2**31 - 1, label="label (0: all)",
                              tooltip="The painted value to propagate; 0: every structure painted, "
                                      "into one layer.")
        self._target = ComboBox(label="result into", choices=self._target_choices,
                                tooltip="A new labels layer, or an existing one (other labels in it are kept).")
        from .engine import DEFAULT_MODEL, bundled_models

        others = [f"bundled {name}" for name, path in bundled_models().items()
                  if name != "default" and path.name != DEFAULT_MODEL]  # v0 and v2 beside the default v3
        self._model = ComboBox(label="model", choices=[DEFAULT_MODEL_CHOICE, *others, FILE_MODEL_CHOICE],
                               tooltip="The bundled default (v3) is best on MRI within one scan; bundled v2 "
                                       "on head-and-neck CT and across patients; bundled v0, trained without "
                                       "labels, on anatomy none was fine-tuned on (see the model card); or a "
                                       "checkpoint trained with densemp-train.")
        self._checkpoint = FileEdit(label="checkpoint", filter="*.pt", visible=False)
        self._device = ComboBox(label="device", choices=["auto", "cpu", CPU_INT8, "cuda"],
                                tooltip="auto: a CUDA GPU when present, else the CPU. cpu int8: the network in "
                                        "int8, 1.8x faster on a CPU without native bf16, Dice within 0.7 of fp32 "
                                        "on validation patients.")
        self._modality = ComboBox(label="scan type", choices=[("auto", "auto"), ("CT", "ct"), ("MRI", "mri")],
                                  tooltip="auto: CT when the scan holds air or fat in Hounsfield units (1% of "
                                          "voxels below -50), else MRI. Choose CT for a CT stored as HU + 1024 "
                                          "(auto reads it as MRI).")
        self._axis = ComboBox(label="slicing axis", choices=["auto", "0", "1", "2"],
                              tooltip="auto: each structure across the plane it was painted on (a coronal "
                                      "view's slice walks coronal slices), else the slider's axis.")
        self._between = CheckBox(text="only between the painted slices", value=False)
        self._mirror = CheckBox(text="average with the scan mirrored", value=False,
                                tooltip="The result then mirrors exactly with the scan: for scans whose left and "
                                        "right may be stored the wrong way. Twice the backbone time.")
        self._band = CheckBox(text="keep to the painted intensity band", value=True,
                              tooltip="On MRI, drawn voxels outside the painted voxels' intensity range (widened by "
                                      "a quarter) are dropped, so a spill into a neighbour of another brightness is "
                                      "cut back. On CT, the structure ends at the first slice with under 30% of its "
                                      "voxels in that range. Untick for an MRI with strong intensity inhomogeneity.")
        self._outlines = CheckBox(text="fill painted outlines", value=True,
                                  tooltip="A painted slice that is a closed outline (its unpainted inside at least "
                                          "as large as what is painted) is filled: its inside is the structure. "
                                          "Untick for a ring-shaped structure with a wide hole.")
        self._propagate = PushButton(text="Propagate")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._undo = PushButton(text="Undo propagation", enabled=False)
        self._progress = ProgressBar(value=0, min=0, max=100, label="progress", visible=False)
        self._status = Label(value=PAINT_HINT)
        self._slice_info = Label(value="")
        self._status.native.setWordWrap(True)
        self._status.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        # Paint once, segment many: the painted scan as support for other scans.
        self._many_title = Label(value="<b>Segment the same structure in other scans</b>")
        self._open_images = PushButton(text="Segment in the other open images")
        self._scans_dir = FileEdit(label="scans folder", mode="d")
        self._results_dir = FileEdit(label="results folder", mode="d")
        self._rtstruct = CheckBox(text="DICOM results as RT Structure Sets", value=False,
                                  tooltip="A DICOM series' result is written as a DICOM SEG on its images; ticked, "
                                          "as an RT Structure Set (contours), the form treatment planning systems "
                                          "import. Other scans' results keep their scan's format.")
        self._segment_folder = PushButton(text="Segment folder")
        self.extend([self._image, self._painted, self._new_painting, self._label, self._target, self._model,
                     self._checkpoint, self._device, self._modality, self._axis, self._between, self._mirror,
                     self._band, self._outlines, self._propagate, self._cancel, self._undo, self._progress,
                     self._status, self._slice_info, self._many_title, self._open_images, self._scans_dir,
                     self._results_dir, self._rtstruct, self._segment_folder])

        self._models: dict[tuple[str, str], Any] = {}
        self._feature_cache = None  # created with the engine on first use (torch loads lazily)
        self._cancel_flag = threading.Event()
        self._worker = None
        self._activity = None
        self._runs = 0
        self._undo_stack: list[_Undo] = []
        self._own_results: dict[tuple[str, int], Any] = {}  # (image name, label) -> layer we wrote
        self._written: dict[int, str] = {}  # id(layer) -> digest of what we last wrote there
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)

        self._model.changed.connect(lambda v: setattr(self._checkpoint, "visible", v == FILE_MODEL_CHOICE))
        self._new_painting.changed.connect(self.new_painting_layer)
        self._propagate.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._undo.changed.connect(self.undo)
        self._open_images.changed.connect(self.segment_open_images)
        self._segment_folder.changed.connect(self.segment_folder)
        self.viewer.dims.events.current_step.connect(self._show_slice_info)

    # ------------------------------------------------------------------ inputs
    def new_painting_layer(self) -> None:
        """An empty labels layer on the chosen image's grid (its scale, position and stored
        geometry), chosen as the painting and left in paint mode with label 1. Never replaces a
        layer: napari numbers a repeated name."""
        from napari.layers import Labels

        image = self._image.value
        if image is None or image.ndim != 3 or getattr(image, "rgb", False):
            self._notify_error("Choose a 3D image layer first; the painting layer takes its grid.")
            return
        metadata = mask_metadata(image.metadata)
        layer = Labels(np.zeros(image.data.shape, dtype=np.uint8), name=f"{image.name} painted", scale=image.scale,
                       translate=image.translate, metadata=metadata, opacity=0.7)
        self.viewer.add_layer(layer)
        self.reset_choices()
        self._painted.value = layer
        self.viewer.layers.selection.active = layer
        layer.selected_label = 1
        layer.mode = "paint"
        self._say(PAINT_HINT)

    def _target_choices(self, _widget=None) -> list:
        layers = [] if not hasattr(self, "viewer") else [
            layer for layer in self.viewer.layers
            if layer.__class__.__name__ == "Labels" and layer is not self._painted.value]
        return [NEW_LAYER, *[layer.name for layer in layers]]

    def _slicing_axis(self, image) -> int:
        if self._axis.value != "auto":
            return int(self._axis.value)
        hidden = [a - (self.viewer.dims.ndim - image.ndim) for a in self.viewer.dims.not_displayed]
        hidden = [a for a in hidden if 0 <= a < 3]
        return hidden[0] if self.viewer.dims.ndisplay == 2 and hidden else 0

    def _painting_on(self, image, painted) -> np.ndarray:
        """The painting on the image's grid. A labels layer opened from a file saved on a crop of
        the scan (or a padded copy) is placed where its voxels lie, and shown there."""
        if tuple(painted.data.shape) == tuple(image.data.shape):
            return np.asarray(painted.data)
        geometries = Geometry.from_metadata(painted.metadata), Geometry.from_metadata(image.metadata)
        if None in geometries:
            raise DenseMPError(f"'{painted.name}' has shape {tuple(painted.data.shape)} but '{image.name}' has "
                               f"{tuple(image.data.shape)}: paint in a labels layer on this image's grid (the "
                               f"'New painting layer' button makes one).")
        placed, start = painting_on_image(np.asarray(painted.data), *geometries, painted.name, image.name)
        painted.translate = np.asarray(image.translate)[-3:] + np.asarray(start) * np.asarray(image.scale)[-3:]
        return placed

    def _request(self) -> _Request:
        """Read and check the inputs; a DenseMPError names what is wrong."""
        image, painted = self._image.value, self._painted.value
        if image is None:
            raise DenseMPError("Choose the image layer to segment.")
        if painted is None:
            raise DenseMPError("Add a labels layer and paint the structure on one slice.")
        if getattr(image, "multiscale", False) or getattr(image, "rgb", False):
            raise DenseMPError(f"'{image.name}' is multiscale or RGB; a single-channel 3D scan is needed.")
        if image.ndim != 3:
            raise DenseMPError(f"'{image.name}' is {image.ndim}D; one-shot segmentation needs a 3D volume.")
        painting = self._painting_on(image, painted)
        source = "default"
        if self._model.value == FILE_MODEL_CHOICE:
            source = str(self._checkpoint.value)
            if not self._checkpoint.value or not str(self._checkpoint.value).strip(". "):
                raise DenseMPError("Choose a checkpoint file, or the bundled default model.")
        elif self._model.value != DEFAULT_MODEL_CHOICE:  # another bundled model, e.g. "bundled v2"
            source = str(self._model.value).removeprefix("bundled ")
        return _Request(
            volume=np.asarray(image.data), painted=painting,
            spacing=tuple(float(s) for s in image.scale[-3:]), axis=self._slicing_axis(image),
            label=int(self._label.value) or None, model_source=source, device=self._device.value,
            between_painted_only=bool(self._between.value), mirror_average=bool(self._mirror.value),
            intensity_band=bool(self._band.value), fill_outlines=bool(self._outlines.value),
            modality=str(self._modality.value),
            axis_auto=self._axis.value == "auto", image_layer=image, geometry=Geometry.from_metadata(image.metadata))

    # ------------------------------------------------------------------ running
    def _load_model(self, source: str, device: str):
        from .engine import FeatureCache, load_model

        if self._feature_cache is None:
            self._feature_cache = FeatureCache(max_volumes=2)
        key = (source, device)
        if key not in self._models:  # one model in memory at a time
            int8 = device == CPU_INT8
            self._models = {key: load_model(source, "cpu" if int8 else device, "int8" if int8 else "auto")}
        return self._models[key]

    def _compute(self, request: _Request, run: int):
        """Runs in the worker thread: plain engine calls only. Returns the result (its mask: any
        structure), the labels propagated and the label volume, on the display grid."""
        from .engine import (
            confidence_along,
            painted_labels,
            painted_planes,
            painting_axis,
            propagate,
            propagate_labels,
        )

        model = self._load_model(request.model_source, request.device)
        options = request.options(model, between_painted_only=request.between_painted_only)
        volume, painted, spacing, axis, affine = request.on_stored_grid()
        labels = [request.label] if request.label else painted_labels(painted)
        kwargs = dict(options=options, modality=request.modality, cache=self._feature_cache,
                      cancel=self._cancel_flag.is_set, affine=affine,
                      progress=lambda done, total, stage: self._relay.progressed.emit(run, done, total, stage))
        if request.axis_auto:  # each structure across the plane it was painted on, else the slider's
            walks = {label: painting_axis(painted == label, default=axis) for label in labels}
        else:
            walks = dict.fromkeys(labels, axis)
        if len(labels) == 1:
            results = {labels[0]: propagate(volume, painted, model, spacing=spacing, axis=walks[labels[0]],
                                            label=labels[0], **kwargs)}
            values = results[labels[0]].mask.astype(np.uint8 if labels[0] <= 255 else np.int32)  # the layer's dtype
            values *= labels[0]
        else:  # every structure painted, one run (see propagate_labels)
            values, results = propagate_labels(volume, painted, model, spacing=spacing, axis=walks, **kwargs)
        # Reported along the slider's axis, whichever plane each structure was walked across.
        confidence = np.max([r.confidence if r.axis == axis else confidence_along([r], r.mask, axis)
                             for r in results.values()], axis=0)
        result = replace(results[labels[0]], confidence=confidence,
                         seconds_features=sum(r.seconds_features for r in results.values()),
                         seconds_head=sum(r.seconds_head for r in results.values()),
                         reused_features=all(r.reused_features for r in results.values()),
                         filled_outlines=[o for r in results.values() for o in r.filled_outlines],
                         tiny_paintings=[request.display_voxel(*t) for r in results.values()
                                         for t in r.tiny_paintings])
        values, result.confidence = request.to_display(values, result.confidence)
        result.mask = values != 0
        on_slices = np.flatnonzero(result.mask.any(axis=tuple(a for a in range(3) if a != request.axis)))
        result.slice_range = (int(on_slices[0]), int(on_slices[-1])) if on_slices.size else None
        drawn = request.painted != 0 if request.label is None else request.painted == request.label
        result.painted_slices = painted_planes(drawn, request.axis)[request.axis]  # not a coronal correction's lines
        return result, labels, values

    def run(self) -> None:
        """Propagate in a background thread; errors become notifications, never dialogs."""
        request = self._checked_request()
        if request is not None:
            self._start(self._compute, self._on_result, request)

    def _checked_request(self) -> _Request | None:
        """The inputs, or None after telling the user what is wrong with them."""
        try:
            return self._request()
        except DenseMPError as exc:
            self._notify_error(str(exc))
            return None

    def _start(self, compute, on_result, request) -> None:
        """Run ``compute(request, run)`` in a thread_worker; ``on_result(request, result, seconds)``."""
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        if self._worker is not None:
            return
        self._cancel_flag.clear()
        self._runs += 1
        self._set_running(True)
        start = time.perf_counter()
        self._activity = progress(total=100, desc="One-shot segment")  # napari's activity dock
        # The run ends in "returned" or "errored" (not "finished", which can arrive first and
        # drop the last reference to the worker before its result is delivered).
        worker = thread_worker(compute, start_thread=False, connect={
            "returned": lambda result: self._end_run(on_result, request, result, time.perf_counter() - start),
            "errored": lambda exc: self._end_run(self._on_error, exc)})(request, self._runs)
        self._worker = worker
        worker.start()

    def _end_run(self, handler, *args) -> None:
        try:
            handler(*args)
        finally:
            self._set_running(False)

    def cancel(self) -> None:
        self._cancel_flag.set()
        self._say("Cancelling...")

    def wait(self, timeout: float = 120.0) -> None:
        """Block (processing Qt events) until the current run ends: for tests and scripts."""
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout
        while self._worker is not None and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        if self._worker is not None:
            raise TimeoutError("propagation still running")

    def _set_running(self, running: bool) -> None:
        self._propagate.enabled = self._open_images.enabled = self._segment_folder.enabled = not running
        self._cancel.enabled = running
        self._progress.visible = running
        self._progress.value = 0
        self._progress.max = 100
        if not running:
            if self._activity is not None:
                self._activity.close()
                self._activity = None
            self._worker = None
            self._undo.enabled = bool(self._undo_stack)

    def _on_progress(self, run: int, done: int, total: int, stage: str) -> None:
        if run != self._runs or self._worker is None:
            return  # queued from a run that has ended
        if total > 0:
            self._progress.max = 100
            self._progress.value = int(100 * done / total)
            self._say(f"{stage}...")
        else:  # walking: where the structure ends is not known beforehand, so a busy bar and a count
            self._progress.value = 0
            self._progress.max = 0
            self._say(f"{stage}: {done} slices...")
        # Last: napari's progress bar may process events, delivering the run's end in here.
        activity = self._activity
        if activity is not None:
            activity.set_description(f"One-shot segment: {stage}")
            if total > 0:
                if activity.total != 100:
                    activity.total = 100
                activity.update(self._progress.value - activity.n)
            elif activity.total != 0:
                activity.total = 0  # napari shows an indeterminate bar

    def _on_error(self, exc: Exception) -> None:
        from .engine import Cancelled

        if isinstance(exc, Cancelled):
            self._say("Cancelled; nothing was changed.")
            return
        if isinstance(exc, DenseMPError):
            self._notify_error(str(exc))
            return
        log.exception("propagation failed", exc_info=exc)
        self._notify_error(f"Propagation failed: {type(exc).__name__}: {exc}")

    def _say(self, text: str) -> None:
        """Show ``text`` in the status line, as tall as its wrapped lines need: magicgui's label
        keeps the height of its first text, and a longer one (a tip, a folder's failures) was cut."""
        self._status.value = text
        label = self._status.native
        label.setMinimumHeight(label.heightForWidth(label.width() if label.width() > 100 else 300))

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._say(message)
        show_error(message)

    # ------------------------------------------------------------------ results
    def _on_result(self, request: _Request, outcome, seconds: float) -> None:
        result, labels, values = outcome
        # One result layer per image and label; one for all the structures of a multi-label run.
        layer, created = self._result_layer(request, labels[0] if len(labels) == 1 else 0, values.shape)
        previous = None if created else np.array(layer.data, copy=True)
        if created:
            data = values.astype(np.uint8 if max(labels) <= 255 else np.int32, copy=False)
        else:
            data = np.array(layer.data, copy=True)
            data[np.isin(data, labels)] = 0
            free = result.mask & (data == 0)  # other structures in the layer are kept
            data[free] = values[free]
        label = labels[0] if len(labels) == 1 else labels
        summary = {"label": label, "axis": request.axis, "slice_range": result.slice_range,
                   "painted_slices": result.painted_slices, "confidence": result.confidence.tolist()}
        if created:
            self.viewer.add_layer(layer)
        layer.data = data
        layer.metadata = {**layer.metadata, RESULT_KEY: summary}
        self._written[id(layer)] = _digest(data)
        self._undo_stack = [*self._undo_stack[-(UNDO_DEPTH - 1):], _Undo(layer, previous)]
        self._undo.enabled = True

        rng = result.slice_range
        kept = result.confidence[result.confidence > 0]
        features = "features reused" if result.reused_features else f"features {result.seconds_features:.1f} s"
        extent = f"slices {rng[0]}-{rng[1]}" if rng else "no slice"
        voxel_ml = float(np.prod(request.spacing)) / 1000.0  # the layer's scale: mm per voxel
        volumes = ", ".join((f"{value}: " if len(labels) > 1 else "") + f"{(values == value).sum() * voxel_ml:.1f} ml"
                            for value in labels)
        self._say(f"'{layer.name}': {extent} along axis {request.axis}\n"
                  f"volume {volumes}; read as {result.read_as}\n"
                  f"mean confidence {kept.mean() if kept.size else 0:.2f}; "
                  f"{seconds:.1f} s ({features})" + (_OUTLINE_NOTE if result.filled_outlines else "")
                  + "".join(f"\nTip: {tiny_painting_tip(*t)}" for t in result.tiny_paintings)
                  + "".join(_tips(request, labels, values)))
        self._last = (layer, summary)
        self._show_slice_info()

    def _result_layer(self, request: _Request, label: int, shape: tuple[int, ...]):
        """The layer to write into and whether it is new: the chosen one, our earlier result for
        this image and label if nobody edited it since, or a new one."""
        from napari.layers import Labels

        if self._target.value != NEW_LAYER:
            layer = next((lyr for lyr in self.viewer.layers if lyr.name == self._target.value), None)
            if layer is not None and layer is not self._painted.value and tuple(layer.data.shape) == shape:
                return layer, False
        image = request.image_layer
        key = (image.name, label)
        own = self._own_results.get(key)
        if own is not None and own in self.viewer.layers and _digest(own.data) == self._written.get(id(own)):
            return own, False
        metadata = mask_metadata(image.metadata)
        name = f"{image.name} {label} propagated" if label else f"{image.name} propagated"
        layer = Labels(np.zeros(shape, dtype=np.uint8), name=name,
                       scale=image.scale, translate=image.translate, metadata=metadata, opacity=0.5)
        self._own_results[key] = layer
        return layer, True

    # ------------------------------------------------------------------ paint once, segment many
    def _support(self, request: _Request):
        """The painted scan as a :class:`~napari_densemp.batch.Support` on its stored grid."""
        from .batch import Support
        from .io import Scan

        volume, painted, _, axis, affine = request.on_stored_grid()
        return Support(Scan(volume, affine, None, None), painted, request.label), axis

    def _layer_scan(self, layer):
        """An image layer as a Scan on its stored grid (its affine, or one from its scale)."""
        from .io import Scan

        geometry = Geometry.from_metadata(layer.metadata)
        data = np.asarray(layer.data)
        if geometry is not None and geometry.display_shape == data.shape:
            return Scan(geometry.stored(data), geometry.affine, None, None), geometry
        return Scan(data, np.diag([*(float(s) for s in layer.scale[-3:]), 1.0]), None, None), None

    def segment_open_images(self) -> None:
        """The painted structure, found and segmented in every other open 3D image layer."""
        request = self._checked_request()
        if request is None:
            return
        others = [layer for layer in self.viewer.layers if layer.__class__.__name__ == "Image"
                  and layer is not request.image_layer and layer.ndim == 3 and not layer.rgb]
        if not others:
            self._notify_error("Open the other scans as image layers first (File > Open).")
            return
        request.targets = others
        self._start(self._compute_many, self._on_many, request)

    def _compute_many(self, request: _Request, run: int) -> list:
        from .batch import segment_scan
        from .engine import FeatureCache, walked_axes

        model = self._load_model(request.model_source, request.device)
        support, axis = self._support(request)
        planes = len(walked_axes(support.mask, axis))  # painted on two planes: both support passes kept
        cache = self._feature_cache if planes == 1 else FeatureCache(max_volumes=2 * planes)
        results = []
        for i, layer in enumerate(request.targets):
            self._relay.progressed.emit(run, i, len(request.targets), f"segmenting '{layer.name}'")
            scan, geometry = self._layer_scan(layer)
            try:
                values, found = segment_scan(support, scan, model, axis, request.options(model), cache,
                                             self._cancel_flag.is_set, request.modality)
                if len(found) == 1:  # a 0/1 mask: give it the painted value
                    [label] = found
                    values = values.astype(np.uint8 if label <= 255 else np.int32) * label
                values = geometry.display(values) if geometry is not None else values
                results.append((layer, values, found, ""))
            except DenseMPError as exc:
                results.append((layer, None, None, str(exc)))
        return results

    def _on_many(self, request: _Request, results: list, seconds: float) -> None:
        from napari.layers import Labels

        lines = []
        for layer, values, found, message in results:
            if values is None:
                lines.append(f"'{layer.name}': failed: {message}")
                continue
            metadata = mask_metadata(layer.metadata)
            which = f" {next(iter(found))}" if len(found) == 1 else ""
            new = Labels(values, scale=layer.scale, translate=layer.translate, metadata=metadata, opacity=0.5,
                         name=f"{layer.name}{which} like {request.image_layer.name}")
            self.viewer.add_layer(new)
            self._undo_stack = [*self._undo_stack[-(UNDO_DEPTH - 1):], _Undo(new, None)]
            ranges = [(label, r.slice_range) for label, r in found.items()]
            lines.append(f"'{layer.name}': " + "; ".join(
                (f"{label}: " if len(found) > 1 else "") + (f"slices {rng[0]}-{rng[1]}" if rng else "not found")
                for label, rng in ranges) + f" (read as {next(iter(found.values())).read_as})")
        outlined = any(r.filled_outlines for _, _, found, _ in results if found for r in found.values())
        self._say("\n".join(lines) + f"\n{seconds:.1f} s" + (_OUTLINE_NOTE if outlined else ""))

    def segment_folder(self) -> None:
        """Every scan of a folder, results in another folder (each in its scan's format) with a summary table."""
        try:
            request = self._request()
            scans_dir, results_dir = Path(self._scans_dir.value), Path(self._results_dir.value)
            if not str(self._scans_dir.value).strip(". ") or not scans_dir.is_dir():
                raise DenseMPError("Choose the folder of scans to segment.")
            if not str(self._results_dir.value).strip(". ") or results_dir.resolve() == scans_dir.resolve():
                raise DenseMPError("Choose a results folder other than the scans folder.")
            from .batch import list_scans

            request.scans = list_scans(scans_dir)
            if not request.scans:
                raise DenseMPError(f"No scan (NIfTI, NRRD or MetaImage file, DICOM folder) in {scans_dir}.")
            request.results_dir = results_dir
            request.rtstruct = bool(self._rtstruct.value)
        except DenseMPError as exc:
            self._notify_error(str(exc))
            return
        self._start(self._compute_folder, self._on_folder, request)

    def _compute_folder(self, request: _Request, run: int):
        from .batch import segment_folder, write_summary

        model = self._load_model(request.model_source, request.device)
        support, axis = self._support(request)
        total = len(request.scans)
        done = []

        def on_scan(rows) -> None:
            done.append(rows[0])
            self._relay.progressed.emit(run, len(done), total, f"{rows[0].scan}: {rows[0].status}")

        self._relay.progressed.emit(run, 0, total, "segmenting scans")
        rows = segment_folder(support, request.scans, request.results_dir, model, axis,
                              request.options(model), on_scan=on_scan,
                              cancel=self._cancel_flag.is_set, modality=request.modality, rtstruct=request.rtstruct)
        outlined = bool(request.fill_outlines and support.outlines(axis))
        return rows, write_summary(rows, request.results_dir / "summary.csv"), outlined

    def _on_folder(self, request: _Request, outcome, seconds: float) -> None:
        from .batch import scan_counts

        rows, summary, outlined = outcome
        failed = [r for r in rows if r.status == "failed"]
        counts = scan_counts(rows)
        text = (f"{counts['done']} segmented, {counts['skipped (exists)']} already done, {len(failed)} failed of "
                f"{len(request.scans)} in {seconds:.1f} s; table: {summary}")
        self._say(text + "".join(f"\n{r.scan}: {r.message}" for r in failed[:5]) + (_OUTLINE_NOTE if outlined else ""))
        if failed:
            from napari.utils.notifications import show_warning

            show_warning(f"{len(failed)} scan(s) failed; see {summary}")

    def undo(self) -> None:
        """Undo the last propagation as a whole (restores the layer, or removes the one it made)."""
        if not self._undo_stack:
            return
        entry = self._undo_stack.pop()
        if entry.previous is None:
            if entry.layer in self.viewer.layers:
                self.viewer.layers.remove(entry.layer)
        else:
            entry.layer.data = entry.previous
            self._written[id(entry.layer)] = _digest(entry.previous)
        self._undo.enabled = bool(self._undo_stack)
        self._say(f"Undid the propagation into '{entry.layer.name}'.")
        self._slice_info.value = ""

    def _show_slice_info(self, _event=None) -> None:
        last = getattr(self, "_last", None)
        if last is None or last[0] not in self.viewer.layers:
            return
        layer, summary = last
        axis = summary["axis"] + (self.viewer.dims.ndim - layer.ndim)
        if axis >= len(self.viewer.dims.current_step):
            return
        z = int(self.viewer.dims.current_step[axis])
        confidence = summary["confidence"]
        if not 0 <= z < len(confidence):
            return
        state = "painted" if z in summary["painted_slices"] else (
            f"confidence {confidence[z]:.2f}" if confidence[z] > 0 else "not segmented")
        self._slice_info.value = f"slice {z}: {state}"
