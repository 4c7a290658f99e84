"""The watershed's alternatives, each measured on the development set (the numbers in docs/segmentation.md).

Development set: the real MERSCOPE crop and CosMx FOV (against the vendor's cells) and synthetic
seeds 1 and 2 (300 µm, against truth). Each line changes one thing from the defaults
(``WatershedParams()``) and prints F1 / fraction of reference-assigned transcripts on the matched
cell per sample. Lines measured before a later default changed pin the settings they were measured
with (``smooth_fraction: None``, ``h_um: 0.45`` …), so every line reprints the figure in
docs/segmentation.md. Held-out numbers are in ``bench_segmentation.py`` (other synthetic seeds).
``--cosmx-cytoplasm G|R`` gives the CosMx FOV a composite channel as its cytoplasm stain.

Run: ``python benchmarks/bench_segmentation_alternatives.py [--only NAME,...]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # sopa's conflict-resolution progress bars
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "smoothing 0.06 x the image's median nucleus diameter": {"smooth_fraction": 0.06},
    "smoothing 0.10 x the image's median nucleus diameter": {"smooth_fraction": 0.10},
    # --- every line below uses the fixed 0.64 µm smoothing (smooth_fraction None), as when it was measured
    "fixed smoothing 0.64 µm (defaults of the previous step)": {"smooth_fraction": None},
    "previous defaults (h-maxima 0.45 µm, no re-split)": {"h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "no re-split of large objects (h-maxima 0.6 µm alone)": {"split_area_ratio": None, "smooth_fraction": None},
    "naive global Otsu + 2 µm (issue's reference)": {"threshold": "otsu", "half_max": None, "expansion": "fixed", "expand_um": 2.0,
                                                     "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "no half-maximum boundary": {"half_max": None, "smooth_fraction": None},
    "fixed 3 µm expansion": {"expansion": "fixed", "expand_um": 3.0, "smooth_fraction": None},
    "fixed 6 µm expansion": {"expansion": "fixed", "expand_um": 6.0, "smooth_fraction": None},
    "adaptive up to 9 µm": {"expand_um": 9.0, "smooth_fraction": None},
    "adaptive from 0 µm": {"min_expand_um": 0.0, "smooth_fraction": None},
    "adaptive up to 4 µm": {"expand_um": 4.0, "smooth_fraction": None},
    "adaptive up to 5 µm": {"expand_um": 5.0, "smooth_fraction": None},
    "adaptive rings 1 µm": {"ring_um": 1.0, "smooth_fraction": None},
    "no cytoplasm stain limit": {"use_cytoplasm_stain": False, "smooth_fraction": None},
    "cytoplasm stain limits only the cells that take it": {"cytoplasm_scope": "stained_cells", "smooth_fraction": None},
    "half-maximum boundary at 0.3 of the way": {"half_max": 0.3, "smooth_fraction": None},
    "half-maximum boundary at 0.4 of the way": {"half_max": 0.4, "smooth_fraction": None},
    "half-maximum at 0.4 + seeds weighted by intensity": {"half_max": 0.4, "seed_intensity_weight": 1.0, "smooth_fraction": None},
    "half-maximum at 0.3 + h-maxima 0.75 µm": {"half_max": 0.3, "h_um": 0.75, "smooth_fraction": None},
    "cytoplasm threshold block 16 µm": {"cytoplasm_block_um": 16.0, "smooth_fraction": None},
    "h-maxima 0.3 µm": {"h_um": 0.3, "smooth_fraction": None},
    "h-maxima 0.75 µm": {"h_um": 0.75, "smooth_fraction": None},
    "seeds weighted by intensity": {"seed_intensity_weight": 1.0, "smooth_fraction": None},
    "background-subtracted threshold": {"threshold": "background", "smooth_fraction": None},
    "local threshold block 24 µm": {"local_block_um": 24.0, "smooth_fraction": None},
    "smoothing 0.4 µm": {"smooth_um": 0.4, "smooth_fraction": None},
    "smoothing 0.5 µm": {"smooth_um": 0.5, "smooth_fraction": None},
    # --- measured against the previous defaults (h-maxima 0.45 µm, no re-split): each line sets them
    "expansion edge against each cell's local outer density": {"expansion_background": "local", "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "half-maximum plateau at the 90th percentile": {"plateau_percentile": 90.0, "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "half-maximum plateau at the 99th percentile": {"plateau_percentile": 99.0, "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "seeds: intensity h-maxima (0.1 contrast)": {"seed_source": "intensity", "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "seeds: intensity h-maxima (0.05 contrast)": {"seed_source": "intensity", "seed_intensity_h": 0.05, "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "seeds: intensity h-maxima (0.2 contrast)": {"seed_source": "intensity", "seed_intensity_h": 0.2, "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "seeds: distance + intensity landscape": {"seed_source": "both", "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "h 0.2 µm + merge convex pieces (solidity 0.90)": {"h_um": 0.2, "merge_solidity": 0.90, "split_area_ratio": None, "smooth_fraction": None},
    "h 0.2 µm + merge convex pieces (solidity 0.85)": {"h_um": 0.2, "merge_solidity": 0.85, "split_area_ratio": None, "smooth_fraction": None},
    "h 0.2 µm + merge convex pieces (solidity 0.93)": {"h_um": 0.2, "merge_solidity": 0.93, "split_area_ratio": None, "smooth_fraction": None},
    "h 0.45 µm + merge convex pieces (solidity 0.90)": {"merge_solidity": 0.90, "h_um": 0.45, "split_area_ratio": None, "smooth_fraction": None},
    "re-split objects > 2x median area (distance, h/3)": {"split_area_ratio": 2.0, "split_h_fraction": 0.33, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 2x median area (stain, 0.33 contrast)": {"split_area_ratio": 2.0, "split_source": "intensity", "split_h_fraction": 0.33, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 2x median area (stain, 0.15 contrast)": {"split_area_ratio": 2.0, "split_source": "intensity", "split_h_fraction": 0.15, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 1.5x median area (stain, 0.33 contrast)": {"split_area_ratio": 1.5, "split_source": "intensity", "split_h_fraction": 0.33, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 1x median area (stain, 0.10 contrast)": {"split_area_ratio": 1.0, "split_source": "intensity", "split_h_fraction": 0.10, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 1x median area (stain, 0.05 contrast)": {"split_area_ratio": 1.0, "split_source": "intensity", "split_h_fraction": 0.05, "h_um": 0.45, "smooth_fraction": None},
    "re-split objects > 1x median area (distance, h/2)": {"split_area_ratio": 1.0, "split_h_fraction": 0.5, "h_um": 0.45, "smooth_fraction": None},
    "h 0.6 µm + re-split objects > 2x median area (distance, h/2)": {"h_um": 0.6, "split_area_ratio": 2.0, "split_h_fraction": 0.5, "smooth_fraction": None},
    "h 0.6 µm + re-split objects > 1.5x median area (distance, h/2)": {"h_um": 0.6, "split_area_ratio": 1.5, "split_h_fraction": 0.5, "smooth_fraction": None},
    "h 0.6 µm + re-split objects > 1.25x median area (distance, h/2)": {"h_um": 0.6, "split_area_ratio": 1.25, "split_h_fraction": 0.5, "smooth_fraction": None},
    "h 0.6 µm + re-split objects > 1.5x median area (distance, h/3)": {"h_um": 0.6, "split_area_ratio": 1.5, "split_h_fraction": 0.33, "smooth_fraction": None},
    "h 0.6 µm + re-split objects > 1.5x median area (distance, 3h/4)": {"h_um": 0.6, "split_area_ratio": 1.5, "split_h_fraction": 0.75, "smooth_fraction": None},
    "h 0.75 µm + re-split objects > 1.5x median area (distance, h/2)": {"h_um": 0.75, "split_area_ratio": 1.5, "split_h_fraction": 0.5, "smooth_fraction": None},
}


def _ids(s):
    return s.astype(object).where(s.notna(), None).to_numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="variant names separated by ; (default: all)")
    ap.add_argument("--cosmx-cytoplasm", default="", help="use this CosMx composite channel (R or G) as the cytoplasm stain")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("sopa").setLevel(logging.ERROR)
    from spatial_assets.segmentation.metrics import transcript_agreement
    from spatial_assets.segmentation.nuclei import WatershedParams
    from spatial_assets.segmentation.pipeline import segment
    from spatial_assets.segmentation.readers import read_sample
    from spatial_assets.segmentation.synthetic import SyntheticSpec, write_merscope_sample

    tmp = tempfile.TemporaryDirectory(prefix="bench_alt_")
    folders = {"merscope": ROOT / "data/raw/merscope_mouse_brain_mini", "cosmx": ROOT / "data/raw/cosmx_lung_mini"}
    for seed in (1, 2):
        d = Path(tmp.name) / f"syn{seed}"
        write_merscope_sample(d, SyntheticSpec(width_um=300, height_um=300, seed=seed))
        folders[f"syn{seed}"] = d
    samples = {k: read_sample(v) for k, v in folders.items()}
    if args.cosmx_cytoplasm:
        samples["cosmx"].image.cytoplasm_channel = args.cosmx_cytoplasm
    refs = {k: (_ids(s.transcripts["vendor_cell_id"]) if k.startswith("syn") else _ids(segment(s, "vendor").transcripts["cell_id"]))
            for k, s in samples.items()}
    wanted = [v.strip() for v in args.only.split(";") if v.strip()] or list(VARIANTS)
    print("F1 / % of reference-assigned transcripts on the matched cell")
    for name in wanted:
        p = replace(WatershedParams(), **VARIANTS[name])
        cols = []
        t0 = time.perf_counter()
        for k, s in samples.items():
            a = transcript_agreement(_ids(segment(s, "watershed", params=p).transcripts["cell_id"]), refs[k])
            cols.append(f"{k} {a.f1:.3f}/{a.matched_transcript_fraction:.1%}")
        print(f"{name:45s} " + "  ".join(cols) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
