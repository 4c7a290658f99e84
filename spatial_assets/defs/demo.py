"""``make demo``: the whole platform on bundled real data, against a real local S3.

1. starts the local SeaweedFS S3 (credentials generated on first start, anonymous refused) unless
   it is already running — and stops it again at the end if it started it,
2. uploads the POA scRNA-seq reference and writes the references manifest,
3. lands the two POA MERFISH slices (Moffitt 2018, Bregma 0.21 / 0.26) as two samples, and the real
   MERSCOPE mouse-brain crop (``data/raw/merscope_mouse_brain_mini``) as a raw instrument folder,
4. registers the partitions with the same sensors the daemon runs, then launches the named jobs
   (references_job, raw_samples_job for the MERSCOPE folder — read, fingerprint, segment with the
   vendor's cells, QC —, samples_job, panel_models_job per gene panel — the MERSCOPE crop has its
   own panel, so its own model —, celltyping_job, domain_model_job, domains_job) into the
   persistent Dagster instance ($DAGSTER_HOME),
5. prints per-sample summaries, accuracy against the authors' cell classes (MERFISH), segmentation
   and QC figures (MERSCOPE), domain counts, the audit chains (MERFISH slice; MERSCOPE: raw files →
   segmentation → cells → annotations), and how to open the UI (``make ui``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
REFERENCE_FILE = "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH_FILE = "mouse_POA_MERFISH_Moffitt2018.h5ad"
REFERENCE_ID = "poa_moffitt2018"
RAW_FOLDER = DATA / "raw" / "merscope_mouse_brain_mini"
RAW_SAMPLE_ID = "merscope_mouse_brain_mini"
UI_PORT = 3000



def prepare_environment() -> Path:
    home = Path(os.environ.setdefault("SPATIAL_ASSETS_HOME", str(REPO / ".local"))).resolve()
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(home / "dagster_home")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")  # the repo's file is the source of truth
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return home


def stage_demo_data(store, manifest_key: str, landing_prefix: str, s3_settings=None) -> list[str]:
    """Upload the reference and register it, land one h5ad per MERFISH slice (as the CLI does)."""
    import anndata as ad

    from spatial_assets.platform.manifest import ReferenceEntry
    from spatial_assets.platform.registry import land_sample, register_reference

    ref_key = f"raw/references/{REFERENCE_FILE}"
    store.put_file(DATA / REFERENCE_FILE, ref_key)
    # "Ambiguous" and "Unstable" are the authors' placeholders in this reference (data/README.md)
    entry = ReferenceEntry(
        id=REFERENCE_ID,
        uri=store.uri(ref_key),
        label_column="cell_type",
        organism="mouse",
        placeholder_labels=["Ambiguous", "Unstable"],
    )
    register_reference(store, entry, manifest_key=manifest_key, replace=True, s3_settings=s3_settings)
    merfish = ad.read_h5ad(DATA / MERFISH_FILE)
    sample_ids = []
    with tempfile.TemporaryDirectory() as tmp:
        for bregma in sorted(merfish.obs["Bregma"].unique()):
            sid = f"poa_bregma_{float(bregma):.2f}"
            part = merfish[merfish.obs["Bregma"] == bregma].copy()
            path = Path(tmp) / f"{sid}.h5ad"
            part.write_h5ad(path)
            land_sample(store, sid, str(path), landing_prefix=landing_prefix, replace=True, s3_settings=s3_settings)
            sample_ids.append(sid)
    return sample_ids


def stage_raw_demo_data(store, landing_prefix: str) -> list[str]:
    """Land the real MERSCOPE crop as an instrument output folder (as `sample land --id ID DIR` does)."""
    from spatial_assets.platform.registry import land_sample

    land_sample(store, RAW_SAMPLE_ID, str(RAW_FOLDER), landing_prefix=landing_prefix, replace=True)
    return [RAW_SAMPLE_ID]


def register_with_sensors(defs, instance) -> None:
    """Tick both sensors once, as the daemon would, and apply their partition requests."""
    import dagster as dg

    for name in ("reference_manifest_sensor", "sample_landing_sensor"):
        sensor = defs.resolve_sensor_def(name)
        with dg.build_sensor_context(instance=instance, resources=defs.resources, sensor_name=name) as ctx:
            result = sensor(ctx)
        if isinstance(result, dg.SensorResult):
            for req in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def panels_of(instance, sample_ids: list[str]) -> dict[str, str]:
    """sample → the panel its latest ``sample_panel`` materialization recorded."""
    import dagster as dg

    from spatial_assets.defs.history import latest_metadata_by_partition

    return latest_metadata_by_partition(instance, dg.AssetKey("sample_panel"), "panel_id", sample_ids)


def materialize_all(
    defs, instance, sample_ids: list[str], reference_ids: list[str], with_domains: bool = True, raw_sample_ids: list[str] = ()
) -> None:
    """Launch the named jobs in dependency order (the same runs the sensors and automation make).

    ``raw_sample_ids`` (also in ``sample_ids``): samples landed as instrument folders, segmented and
    QC'd by ``raw_samples_job`` before ``samples_job`` reads their QC'd cells."""
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the full event log is in the UI

    def run(job_name: str, partition: str | None = None) -> None:
        job = defs.resolve_job_def(job_name)
        t0 = time.perf_counter()
        result = job.execute_in_process(
            instance=instance, partition_key=partition, run_config=quiet, tags={"spatial_assets/trigger": "demo"}
        )
        failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
        note = f"  ({len(failed)} check(s) not passed: {[e.check_name for e in failed]})" if failed else ""
        label = f"{job_name}[{partition}]" if partition else job_name
        print(f"  ran {label} in {time.perf_counter() - t0:.1f}s{note}", flush=True)

    for rid in reference_ids:
        run("references_job", rid)
    for sid in raw_sample_ids:
        run("raw_samples_job", sid)
    for sid in sample_ids:
        run("samples_job", sid)
    panels = panels_of(instance, sample_ids)
    for pid in sorted(set(panels.values())):
        run("panel_models_job", pid)
    for sid in sample_ids:
        run("celltyping_job", sid)
    if with_domains:
        run("domain_model_job")
        for sid in sample_ids:
            run("domains_job", sid)


def report(store, sample_ids: list[str], with_domains: bool) -> None:
    import anndata as ad
    import pandas as pd

    from spatial_assets.celltyping.pipeline import POA_LABEL_MAP, score_against_labels
    from spatial_assets.storage.stores import asset_key

    for sid in sample_ids:
        summary = pd.read_parquet(store.get_file(asset_key("cell_type_summary", sid, ".parquet")))
        annotated = ad.read_h5ad(store.get_file(asset_key("cell_type_annotations", sid, ".h5ad")))
        scores = None if "Cell_class_major" not in annotated.obs else score_against_labels(
            annotated.obs["cell_type_predicted"],
            annotated.obs["Cell_class_major"],
            POA_LABEL_MAP,
            confidence=annotated.obs["cell_type_confidence"],
            class_origins=annotated.uns["cell_type_label_map"],
        )
        print(f"\n=== sample {sid}: {annotated.n_obs} cells")
        print(summary[["cell_type", "n_cells", "fraction", "mean_confidence"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if scores is not None:
            print(
                f"accuracy vs authors' Cell_class_major ({scores['n_scored']} scored cells, Ambiguous excluded): "
                f"accuracy {scores['accuracy']:.3f}  balanced accuracy {scores['balanced_accuracy']:.3f}  "
                f"confidence AUROC {scores['confidence_auroc']:.3f}"
            )
        prov = annotated.uns.get("provenance", {})
        if prov.get("raw"):
            seg, qc = prov.get("segmentation", {}), prov.get("cell_qc", {})
            panel = (prov.get("panel") or {}).get("id")
            card = json.loads(store.read_bytes(asset_key("celltype_model", panel, ".pkl.card.json")))
            print(
                f"raw {prov['raw'].get('platform')} folder, {len(prov['raw'].get('files', {}).get('path', []))} files → "
                f"segmentation {seg.get('method')}: {float(seg.get('assigned_fraction', float('nan'))):.1%} of "
                f"{seg.get('n_transcripts_total')} transcripts in cells → QC {qc.get('n_cells_in')} → {qc.get('n_cells_out')} cells "
                f"(control fraction {float(qc.get('control_fraction', float('nan'))):.2%}); model of panel "
                f"{panel} ({len(card.get('genes', []))} of its genes shared with the reference)"
            )
        if with_domains:
            dom = ad.read_h5ad(store.get_file(asset_key("spatial_domains", sid, ".h5ad")))
            counts = dom.obs["domain"].value_counts().sort_index()
            calls = dom.obs.groupby("domain", observed=True)["domain_cell_type"].first()
            print("domains: " + ", ".join(f"{d}={n} ({calls.get(d, '')})" for d, n in counts.items()))


def start_ui(port: int = UI_PORT) -> int:
    """Run ``dagster dev`` until it exits; on Ctrl-C / SIGTERM shut it and everything it started down."""
    cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    print("starting:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        return proc.wait()
    except (KeyboardInterrupt, SystemExit):
        return 130
    finally:
        stop_process_tree(proc)


def stop_process_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (``dagster dev``'s own clean shutdown), then SIGTERM/SIGKILL, for it and its descendants.

    The descendants (webserver, daemon, code servers) are collected first: once ``dagster dev`` is
    gone they are orphans that nobody else would stop.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def local_s3_for_this_command():
    """Start the deployment's bundled S3 (``local_s3``) unless it runs already; stop it on exit if we started it.

    Exit includes Ctrl-C and SIGTERM (turned into SystemExit here so the clean-up runs). Other
    deployments need no server: nothing happens.
    """
    from spatial_assets.storage import local_s3
    from spatial_assets.storage.deployment import StorageSettings

    settings = StorageSettings.from_env()
    if settings.deployment != "local_s3":
        yield None
        return
    started = local_s3.start(settings)
    print(f"local S3: {started.settings.endpoint_url} ({'started' if started.started else 'already running'}; state {settings.state_dir})", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield started
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started.started:
            local_s3.stop(settings)
            print("local S3: stopped (it was started by this command; the data stays in the state dir)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spatial_assets.defs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ui-only", action="store_true", help="only `dagster dev` (with the local S3 running; stopped on exit if started here)")
    parser.add_argument("--no-domains", action="store_true", help="skip the spatial-domain assets")
    parser.add_argument("--port", type=int, default=UI_PORT)
    args = parser.parse_args(argv)
    prepare_environment()
    # signature genes missing from a 134-gene panel are expected; they are recorded in the objects
    warnings.filterwarnings("ignore", message=r".*(signature genes absent|signatures dropped).*")

    from spatial_assets.defs.deployment import build_resources
    from spatial_assets.defs.settings import settings_from_env

    with local_s3_for_this_command():
        resources = {**build_resources(), "settings": settings_from_env()}
        store = resources["storage"].get_store()
        print(f"storage: {store.uri(settings_from_env().manifest_key).rsplit('/', 2)[0]}/  (deployment {os.environ.get('SPATIAL_ASSETS_DEPLOYMENT', 'local_s3')})", flush=True)
        if args.ui_only:
            return start_ui(args.port)
        return run_demo(resources, store, args)


def run_demo(resources: dict, store, args: argparse.Namespace) -> int:
    import dagster as dg

    from spatial_assets.definitions import build_definitions

    t0 = time.perf_counter()
    settings = resources["settings"]
    sample_ids = stage_demo_data(store, settings.manifest_key, settings.landing_prefix, resources["storage"].s3_settings())
    raw_ids = stage_raw_demo_data(store, settings.landing_prefix)
    print(f"staged reference {REFERENCE_ID!r}, samples {sample_ids} and raw instrument folder(s) {raw_ids}", flush=True)
    sample_ids = sample_ids + raw_ids
    defs = build_definitions(resources)
    with dg.DagsterInstance.get() as instance:
        register_with_sensors(defs, instance)
        print(f"partitions: references={instance.get_dynamic_partitions('references')} samples={instance.get_dynamic_partitions('samples')}")
        materialize_all(defs, instance, sample_ids, [REFERENCE_ID], with_domains=not args.no_domains, raw_sample_ids=raw_ids)
        panels = panels_of(instance, sample_ids)
        print("gene panels: " + ", ".join(f"{sid} → {pid}" for sid, pid in sorted(panels.items())))
    report(store, sample_ids, with_domains=not args.no_domains)
    print(f"\naudit of {sample_ids[0]}:")
    from spatial_assets.cli.audit import run_audit

    run_audit(sample_ids[0], store=store, s3_settings=resources["storage"].s3_settings())
    for sid in raw_ids:
        print(f"\naudit of {sid} (raw files → segmentation → cells → annotations):")
        run_audit(sid, store=store, s3_settings=resources["storage"].s3_settings())
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s.")
    print(f"Open the UI with `make ui`, then http://127.0.0.1:{args.port} (same instance: DAGSTER_HOME={os.environ['DAGSTER_HOME']}).")
    return 0

if __name__ == "__main__":
    sys.exit(main())
