"""BLAS threads for the cell-typing steps: 1 vs 2 threads, on idle cores and with busy competitors.

Why: the L-BFGS fit (``celltyping/training.py``) dominates the CLI's wall time, and its two float32
products per gradient evaluation are small; on the 2-core machine class shared with other work,
OpenBLAS's second thread waits for a busy core on every product. This script measures, in ONE run
(so the ratios compare like with like on the same machine state):

* ``products``: one gradient evaluation's two products (``Z @ W.T`` and ``R.T @ Z``), median of reps;
* ``fit``: :func:`train_model` end to end (its L-BFGS fits run under ``training.FIT_BLAS_THREADS``,
  set here to 1 or 2);
* ``annotate``: :func:`annotate` of the spatial sample (batch products are sparse, scipy, no BLAS;
  the alignment's dense log-likelihood products run under ``annotation.ALIGNMENT_BLAS_THREADS``),

each with 1 and 2 BLAS threads (interleaved), first with no added load ("quiet": whatever else runs on
the machine; the load average is printed), then with ``--busy`` competing processes spinning on
the CPU. Printed ratios are time(2 threads) / time(1 thread): above 1 means the second thread hurts.

Data: the synthetic cell-typing set of ``bench_synthetic_celltyping.py`` (references 14k + 6k
cells, 20k spatial cells, 400-gene panel), generated into a temporary directory.
Usage: .venv/bin/python benchmarks/bench_threads.py [--reps 3] [--busy 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

THREADS = (1, 2)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(fns: dict[int, Callable[[], object]], reps: int) -> dict[int, float]:
    """Median seconds per thread count; 1, 2, 1, 2, ... so slow drifts of the machine hit both."""
    times: dict[int, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with threadpool_limits(limits=n, user_api="blas"):
            return fn()

    return run


def _data(out_dir: str) -> tuple[object, object]:
    import anndata as ad

    from spatial_assets.celltyping.pipeline import build_training_set
    from spatial_assets.celltyping.references import ReferenceSpec
    from spatial_assets.celltyping.synthetic import write_celltyping_data
    from spatial_assets.core.spatial import panel_genes

    write_celltyping_data(out_dir, n_ref_cells=(14_000, 6_000), n_spatial=20_000, seed=0)
    spatial = ad.read_h5ad(f"{out_dir}/synthetic_spatial.h5ad")
    specs = [ReferenceSpec(f"{out_dir}/synthetic_ref_{c}.h5ad", "cell_type") for c in "AB"]
    training, _ = build_training_set(specs, panel_genes(spatial), seed=0)
    return training, spatial


def _product_fns(training: object) -> dict[int, Callable[[], object]]:
    """One gradient evaluation's two products at the fit's real shapes (float32, as in training.py)."""
    X = np.asarray(training.X.toarray() if hasattr(training.X, "toarray") else training.X, dtype=np.float32)  # type: ignore[attr-defined]
    X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    Z = np.ascontiguousarray(X, dtype=np.float32)
    K = int(training.obs["cell_type"].nunique())  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    W = rng.normal(size=(K, Z.shape[1])).astype(np.float32)
    R = rng.normal(size=(Z.shape[0], K)).astype(np.float32)

    def products() -> None:
        for _ in range(10):  # ten gradient evaluations per timing (a single one is ~ms)
            Z @ W.T
            R.T @ Z

    return {n: _with_threads(n, products) for n in THREADS}


def _fit_fns(training: object) -> dict[int, Callable[[], object]]:
    from spatial_assets.celltyping import training as training_module

    def fit(n: int) -> Callable[[], object]:
        def run() -> object:
            saved = training_module.FIT_BLAS_THREADS
            training_module.FIT_BLAS_THREADS = n
            try:
                return training_module.train_model(training, seed=0)  # type: ignore[arg-type]
            finally:
                training_module.FIT_BLAS_THREADS = saved

        return run

    return {n: fit(n) for n in THREADS}


def _annotate_fns(model: object, spatial: object) -> dict[int, Callable[[], object]]:
    from spatial_assets.celltyping import annotation

    def run_with(n: int) -> Callable[[], object]:
        def run() -> object:
            saved = annotation.ALIGNMENT_BLAS_THREADS
            annotation.ALIGNMENT_BLAS_THREADS = n
            try:
                return annotation.annotate(spatial, model, seed=0)  # type: ignore[arg-type]
            finally:
                annotation.ALIGNMENT_BLAS_THREADS = saved

        return _with_threads(n, run)

    return {n: run_with(n) for n in THREADS}


def _start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timings per step and thread count (median printed)")
    ap.add_argument("--busy", type=int, default=2, help="competing busy processes in the second phase")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when redirected to a file

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        training, spatial = _data(tmp)
    from spatial_assets.celltyping.training import train_model

    model = train_model(training, seed=0)  # type: ignore[arg-type]
    print(f"data: training set {training.n_obs:,} cells x {training.n_vars} genes x "  # type: ignore[attr-defined]
          f"{len(model.classes)} classes, spatial {spatial.n_obs:,} cells ({time.perf_counter() - t:.1f} s)")  # type: ignore[attr-defined]
    print(f"cores: {os.cpu_count()}; reps per figure: {args.reps}; ratio = time(2 threads) / time(1 thread)")
    steps = {
        "products (10 gradient evaluations)": _product_fns(training),
        "fit (train_model)": _fit_fns(training),
        "annotate": _annotate_fns(model, spatial),
    }
    results: dict[tuple[str, str], dict[int, float]] = {}
    for phase in ("quiet", "busy"):
        procs = _start_busy(args.busy) if phase == "busy" else []
        try:
            if procs:
                time.sleep(1.0)
            label = "no added load" if phase == "quiet" else f"{args.busy} busy processes"
            print(f"\n[{phase}: {label}; load average {_load()}]")
            for name, fns in steps.items():
                r = _interleaved(fns, args.reps)
                results[(phase, name)] = r
                print(f"  {name:<36} 1 thread {r[1]:8.3f} s   2 threads {r[2]:8.3f} s   ratio 2/1 {r[2] / r[1]:5.2f}")
            print(f"  load average at the end: {_load()}")
        finally:
            _stop(procs)
    print("\nsummary (ratio 2 threads / 1 thread; > 1: one thread is faster)")
    for name in steps:
        q, b = results[("quiet", name)], results[("busy", name)]
        print(f"  {name:<36} quiet {q[2] / q[1]:5.2f}   busy {b[2] / b[1]:5.2f}   "
              f"busy/quiet slowdown with 1 thread {b[1] / q[1]:4.2f}, with 2 threads {b[2] / q[2]:4.2f}")


if __name__ == "__main__":
    main()
