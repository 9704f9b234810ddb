"""Propagation speed and memory on this machine (figures, never asserted).

    python benchmarks/speed.py                 # 100 slices of 256x256: whole run, backbone, re-run
    python benchmarks/speed.py --memory        # + peak RSS at 512x512x300 (in a fresh process)
    python benchmarks/speed.py --fp32          # without bf16 autocast, for comparison
    python benchmarks/speed.py --precision int8   # the backbone in int8 (CPU, opt-in)
    python benchmarks/speed.py --backbones 18:3 18:4 34:3 50:3   # candidate architectures
    python benchmarks/speed.py --organ kidney  # a small organ: the walk embeds only its slices

The backbone embeds a slice when the walk first reaches it, so a whole propagation can take
less than "backbone alone" (every slice embedded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from napari_densemp.devices import pick_device, use_bf16
from napari_densemp.engine import FeatureCache, Model, compute_features, load_model, parse_rules, propagate
from napari_densemp.network import FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile
from src_data.phantoms import LIVER, RIGHT_KIDNEY, SPLEEN, make_phantom

ORGANS = {"liver": LIVER, "kidney": RIGHT_KIDNEY, "spleen": SPLEEN}


def phantom_volume(shape: tuple[int, int, int], seed: int = 3, coronal: bool = False,
                   organ: int = LIVER) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A phantom CT resampled to ``shape`` (x, y, z), an organ painted on its largest slice
    (and, with ``coronal``, on its largest slice across axis 1 too: two planes walked)."""
    phantom = make_phantom(seed, "ct")
    zoom = [n / m for n, m in zip(shape, phantom.image.shape)]
    image = ndimage.zoom(phantom.image, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    label = ndimage.zoom(phantom.label, zoom, order=0)[: shape[0], : shape[1], : shape[2]] == organ
    spacing = tuple(s / z for s, z in zip(phantom.spacing, zoom))
    z = int(label.sum(axis=(0, 1)).argmax())
    painted = np.zeros(label.shape, np.uint8)
    painted[..., z] = label[..., z]
    if coronal:
        y = int(label.sum(axis=(0, 2)).argmax())
        painted[:, y] |= label[:, y]
    return image.astype(np.float32), painted, spacing


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs; a GPU is waited for, so queued kernels count."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def candidate(depth: int, last_layer: int, device: str, fp32: bool) -> Model:
    """A backbone candidate with random weights: its speed is the architecture's, not the training's."""
    dev = pick_device(device)
    network = FewShotSegmenter(NetworkConfig(depth=depth, last_layer=last_layer)).eval()
    return Model(network.to(dev).to(memory_format=torch.channels_last), PreprocessingProfile(), dev,
                 f"ResNet-{depth} to layer{last_layer} (random weights)", uses_bf16=not fp32 and use_bf16(dev))


def speed(args: argparse.Namespace, model: Model | None = None) -> None:
    model = model or load_model(args.model, args.device, precision="fp32" if args.fp32 else args.precision)
    image, painted, _ = phantom_volume((256, 256, 100), coronal=args.two_planes, organ=ORGANS[args.organ])
    spacing = (model.profile.in_plane_spacing_mm, model.profile.in_plane_spacing_mm, 2.5)
    slices = np.moveaxis(image, 2, 0)
    run = dict(spacing=spacing, options=model.default_options(**parse_rules(args.rule)))
    embedded = []
    embed = model.embed
    model.embed = lambda batch: embedded.append(len(batch)) or embed(batch)
    propagate(image, painted, model, **run)  # warm-up (allocator, oneDNN kernels); counts slices embedded
    del model.embed  # the method again
    backbone = best_of(lambda: compute_features(model, slices, spacing[:2]), args.repeats)
    whole = best_of(lambda: propagate(image, painted, model, **run), args.repeats)
    cache = FeatureCache(max_volumes=2)  # two planes: both passes cached
    propagate(image, painted, model, cache=cache, **run)
    rerun = best_of(lambda: propagate(image, painted, model, cache=cache, **run), args.repeats)
    print(f"model {model.name}, {model.device}, {model.precision}, {torch.get_num_threads()} threads, {args.organ}"
          + (f", rules {' '.join(args.rule)}" if args.rule else "")
          + (", painted on an axial and a coronal slice" if args.two_planes else ""))
    print("100 slices of 256x256:")
    print(f"  whole propagation   {whole:6.2f} s   {1000 * whole / 100:6.1f} ms/slice")
    print(f"  backbone alone      {backbone:6.2f} s   {1000 * backbone / 100:6.1f} ms/slice (one pass)")
    print(f"  ratio whole/backbone {whole / backbone:5.2f}   (the walk embedded {sum(embedded)} slices"
          + (", both planes)" if args.two_planes else " of 100)"))
    print(f"  re-run (cached)     {rerun:6.2f} s")


def memory_child(model_source: str, device: str, rules: list[str], two_planes: bool, organ: str) -> None:
    image, painted, spacing = phantom_volume((512, 512, 300), coronal=two_planes, organ=ORGANS[organ])
    model = load_model(model_source, device)
    options = model.default_options(**parse_rules(rules))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = propagate(image, painted, model, spacing=spacing, options=options)
    figures = {"seconds": time.perf_counter() - start, "input_mb": image.nbytes / 1e6,
               "rss_before_mb": before / 1024, "peak_rss_mb": resource.getrusage(
                   resource.RUSAGE_SELF).ru_maxrss / 1024, "voxels": int(result.mask.sum())}
    if model.device.type == "cuda":
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated(model.device) / 1e6
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32", action="store_true", help="the same as --precision fp32")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "int8", "fp32"])
    parser.add_argument("--rule", nargs="*", default=[], metavar="NAME=VALUE",
                        help="propagation rules (PropagationOptions fields), e.g. mirror_average=1")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--organ", choices=sorted(ORGANS), default="liver", help="the organ painted (phantom CT)")
    parser.add_argument("--two-planes", action="store_true",
                        help="also paint a coronal slice: both planes walked (backbone alone: the axial pass)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbones", nargs="*", metavar="DEPTH:LAYER",
                        help="time backbone candidates instead (e.g. 18:3 18:4 34:3 50:3)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.model, args.device, args.rule, args.two_planes, args.organ)
        return 0
    if args.backbones:
        for item in args.backbones:
            depth, layer = (int(v) for v in item.split(":"))
            speed(args, candidate(depth, layer, args.device, args.fp32))
        return 0
    speed(args)
    if args.memory:
        out = subprocess.run([sys.executable, __file__, "--memory-child", "--model", args.model,
                              "--device", args.device, "--organ", args.organ, "--rule", *args.rule,
                              *(["--two-planes"] if args.two_planes else [])],
                             check=True, capture_output=True, text=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        print("512x512x300 CT (float32 input "
              f"{figures['input_mb']:.0f} MB): {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mb']:.0f} MB "
              f"(of which {figures['rss_before_mb']:.0f} MB before propagation: Python, torch, the input)"
              + (f", peak GPU memory {figures['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in figures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
