"""A figure of one-slice propagation: the painted slice, then slices through the organ and just
past its ends, with the propagated mask (red) and the truth (green), for users to see.

    python benchmarks/figure.py --data ../shared/data/chaos_t2 --scans image_31 --organs 1 2 4 \\
        --out docs/propagation.png

Each row is one scan and organ: the organ painted on its slice of largest area (yellow), then
slices spread from 3 slices below the organ to 3 above it, in the radiological convention
(anterior up, the patient's right on the left). The 3D Dice of the row is written on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from accuracy import dice, paint_largest_slice
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from napari_densemp.engine import FeatureCache, load_model, propagate
from napari_densemp.io import Geometry
from napari_densemp.preprocessing import detect_modality, window_intensities
from src_data.datasets import find_scans, load_scan

TILE = 192
COLOURS = {"painted": (255, 220, 0), "predicted": (255, 60, 60), "truth": (60, 230, 90)}


def tile(image: np.ndarray, layers: dict[str, np.ndarray], fill: str | None = None) -> Image.Image:
    """A grey slice in [0, 1] with the outlines of ``layers`` (and ``fill`` blended in)."""
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    for name, mask in layers.items():
        if not mask.any():
            continue
        colour = np.array(COLOURS[name], dtype=np.float32)
        if name == fill:
            rgb[mask] = (0.55 * rgb[mask] + 0.45 * colour).astype(np.uint8)
        rgb[find_boundaries(mask, mode="inner")] = colour.astype(np.uint8)
    picture = Image.fromarray(rgb)
    scale = TILE / max(picture.size)
    return picture.resize((round(picture.size[0] * scale), round(picture.size[1] * scale)), Image.NEAREST)


def figure_row(scan, organ: int, model, columns: int) -> tuple[list[Image.Image], list[str], float]:
    truth = scan.label == organ
    painted, z = paint_largest_slice(truth)
    result = propagate(scan.volume, painted.astype(np.uint8), model, spacing=scan.spacing, axis=2,
                       cache=FeatureCache(), affine=scan.affine)
    geometry = Geometry.for_scan(scan.affine, scan.volume.shape)
    display = {name: geometry.display(a) for name, a in
               [("image", window_intensities(scan.volume, detect_modality(scan.volume), model.profile)),
                ("painted", painted.astype(bool)), ("predicted", result.mask), ("truth", truth)]}
    slice_axis, flip = (int(v) for v in geometry.to_display[2])  # where stored axis 2 went, and its sign
    n = truth.shape[2]
    zs = np.flatnonzero(truth.any(axis=(0, 1)))
    wanted = np.unique(np.linspace(max(zs[0] - 3, 0), min(zs[-1] + 3, n - 1), columns).round())
    # crop every tile to the body (plus a margin): a head in a 50 cm field of view is otherwise tiny
    body = np.take(display["image"] > 0.05, range(n), axis=slice_axis).any(axis=slice_axis)
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    margin = 8
    crop = (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))
    images, captions = [], []
    for k, stored in enumerate([z, *[int(v) for v in wanted]]):
        at = stored if flip == 1 else n - 1 - stored
        planes = {name: np.take(a, at, axis=slice_axis)[crop] for name, a in display.items()}
        layers = {"painted": planes["painted"]} if k == 0 else {"truth": planes["truth"],
                                                                "predicted": planes["predicted"]}
        images.append(tile(planes["image"], layers, fill="painted" if k == 0 else None))
        captions.append(f"painted z={stored}" if k == 0 else f"z={stored}")
    return images, captions, dice(result.mask, truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of scans with labels")
    parser.add_argument("--scans", nargs="+", required=True, help="scan names, e.g. image_31 pt_241_ct")
    parser.add_argument("--organs", type=int, nargs="+", required=True, help="label values")
    parser.add_argument("--names", nargs="*", default=[], help="organ names for the captions")
    parser.add_argument("--model", default="default")
    parser.add_argument("--columns", type=int, default=6, help="slices shown after the painted one")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model = load_model(args.model)
    records = {r.name: r for r in find_scans(args.data)}
    rows = []
    for name in args.scans:
        if name not in records:
            parser.error(f"no scan {name!r} in {args.data}")
        scan = load_scan(records[name])
        for i, organ in enumerate(args.organs):
            if scan.label is None or not (scan.label == organ).any():
                print(f"{name}: organ {organ} absent, skipped", file=sys.stderr)
                continue
            images, captions, score = figure_row(scan, organ, model, args.columns)
            label = args.names[i] if i < len(args.names) else f"organ {organ}"
            rows.append((f"{name}, {label}: 3D Dice {100 * score:.1f}", images, captions))
            print(rows[-1][0], flush=True)
    if not rows:
        return 1
    width = max(sum(im.size[0] + 4 for im in images) for _, images, _ in rows)
    heights = [max(im.size[1] for im in images) + 34 for _, images, _ in rows]
    canvas = Image.new("RGB", (width, sum(heights) + 22), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"model {model.name}: yellow = painted, green = truth, red = propagated", fill=(230, 230, 230))
    y = 22
    for (title, images, captions), height in zip(rows, heights):
        draw.text((4, y + 2), title, fill=(230, 230, 230))
        x = 0
        for image, caption in zip(images, captions):
            canvas.paste(image, (x, y + 16))
            draw.text((x + 4, y + 18), caption, fill=(255, 255, 255))
            x += image.size[0] + 4
        y += height
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({canvas.size[0]} x {canvas.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
