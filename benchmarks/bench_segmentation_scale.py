"""Scale of the watershed: synthetic regions of 1 and 5 mm², segmented and aggregated, time and peak memory.

Each size is generated on disk tile by tile (a tiled TIFF; generation never holds the image) and
then segmented in a fresh subprocess, which reports its own peak RSS. Prints cells, seconds,
cells/s, peak RSS and how time and memory grow from the first size to the last (the ratio is the
figure to read on a contended machine). Target (issue): 5 mm² (~20k cells) in <= 5 min on 2 cores
with peak RSS <= 4 GB.

It also times reading one patch of the largest mosaic the way spatialdata-io's MERSCOPE reader
does (dask_image: one chunk per TIFF page) against our tifffile/zarr reader (only the tiles the
patch touches) — the measured reason ``readers.open_tiff`` exists.

Run: ``python benchmarks/bench_segmentation_scale.py [--sizes 1,5] [--pixel-um 0.2125]``
(the 5 mm² size takes minutes: run it once or twice, the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import os; os.environ.setdefault("TQDM_DISABLE", "1")
import json, resource, sys, time, warnings, logging
warnings.filterwarnings("ignore"); logging.getLogger("sopa").setLevel(logging.ERROR)
sys.path.insert(0, {root!r})
mode, folder = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "generate":
    from spatial_assets.segmentation.synthetic import SyntheticSpec, write_merscope_sample
    side, pixel = float(sys.argv[3]), float(sys.argv[4])
    s = write_merscope_sample(folder, SyntheticSpec(width_um=side, height_um=side, pixel_size_um=pixel, seed=21), boundaries=False)
    out = {{"n_cells_true": s["n_cells"], "n_transcripts": s["n_transcripts"], "image_px": s["image_px"]}}
else:
    from spatial_assets.segmentation.readers import read_sample
    from spatial_assets.segmentation.pipeline import segment
    sample = read_sample(folder)
    t1 = time.perf_counter()
    r = segment(sample, "watershed")
    out = {{"read_s": t1 - t0, "segment_s": r.summary["segmentation_seconds"], "n_cells": r.summary["n_cells"],
            "assigned": r.summary["assigned_fraction"]}}
out["seconds"] = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
out["cpu_seconds"] = ru.ru_utime + ru.ru_stime  # what a quiet machine would take, about (one core used)
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
print("RESULT " + json.dumps(out))
"""


def _child(*args: str) -> dict:
    code = CHILD.format(root=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"child {args[0]} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _patch_read(mosaic: Path, patch_px: int) -> tuple[float, float]:
    from dask_image.imread import imread

    from spatial_assets.segmentation.readers import open_tiff

    t = time.perf_counter()
    arr = imread(str(mosaic)).squeeze().rechunk((4096, 4096))  # what spatialdata-io's reader builds
    arr[:patch_px, :patch_px].compute()
    t_dask = time.perf_counter() - t
    t = time.perf_counter()
    open_tiff(mosaic)[:patch_px, :patch_px].compute()
    return t_dask, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,5", help="region sizes in mm²")
    ap.add_argument("--pixel-um", type=float, default=0.2125)
    ap.add_argument("--keep", default=None, help="keep the generated folders under this directory (and reuse them)")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results = []
    for mm2 in sizes:
        side = (mm2 * 1e6) ** 0.5
        folder = base / f"synthetic_{mm2:g}mm2"
        if args.keep and (folder / "synthetic.json").is_file():
            meta = json.loads((folder / "synthetic.json").read_text())
            gen = {"n_cells_true": meta["n_cells"], "n_transcripts": meta["n_transcripts"], "image_px": meta["image_px"]}
            gen_txt = "reused from --keep"
        else:
            gen = _child("generate", str(folder), str(side), str(args.pixel_um))
            gen_txt = f"generated in {gen['seconds']:.0f} s (CPU {gen['cpu_seconds']:.0f} s), peak RSS {gen['peak_rss_gb']:.2f} GB"
        print(f"{mm2:g} mm² ({side:.0f} µm side, image {gen['image_px'][0]}x{gen['image_px'][1]} px at {args.pixel_um} µm): "
              f"{gen['n_cells_true']} true cells, {gen['n_transcripts']} transcripts; {gen_txt}", flush=True)
        seg = _child("segment", str(folder))
        cps = seg["n_cells"] / seg["seconds"]
        print(f"  segmented + aggregated: {seg['n_cells']} cells in {seg['seconds']:.0f} s wall / {seg['cpu_seconds']:.0f} s CPU "
              f"(read {seg['read_s']:.0f} s, segmentation {seg['segment_s']:.0f} s) = {cps:.0f} cells/s wall, "
              f"{seg['n_cells'] / seg['cpu_seconds']:.0f} cells per CPU-second, peak RSS {seg['peak_rss_gb']:.2f} GB, "
              f"{seg['assigned']:.1%} of transcripts assigned", flush=True)
        results.append((mm2, gen, seg))
    if len(results) > 1:
        (a0, _, s0), (a1, _, s1) = results[0], results[-1]
        print(f"growth {a0:g} -> {a1:g} mm² (x{a1 / a0:g} area): wall time x{s1['seconds'] / s0['seconds']:.2f}, "
              f"CPU time x{s1['cpu_seconds'] / s0['cpu_seconds']:.2f}, peak RSS x{s1['peak_rss_gb'] / s0['peak_rss_gb']:.2f}")
        print(f"target 5 mm² <= 300 s and <= 4 GB: wall {'met' if s1['seconds'] <= 300 else 'NOT met'}, "
              f"CPU {'met' if s1['cpu_seconds'] <= 300 else 'NOT met'}, memory {'met' if s1['peak_rss_gb'] <= 4 else 'NOT met'} "
              f"(load average {__import__('os').getloadavg()[0]:.1f} on this shared machine)")
    mosaic = base / f"synthetic_{sizes[-1]:g}mm2" / "images" / "mosaic_DAPI_z0.tif"
    patch_px = int(round(400 / args.pixel_um))
    t_dask, t_zarr = _patch_read(mosaic, patch_px)
    print(f"one {patch_px}x{patch_px} px patch of the {sizes[-1]:g} mm² mosaic: dask_image (spatialdata-io) {t_dask:.2f} s, "
          f"tifffile zarr (ours) {t_zarr:.2f} s, ratio {t_dask / max(t_zarr, 1e-9):.1f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
