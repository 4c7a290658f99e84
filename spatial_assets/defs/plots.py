"""Store plots beside the object they describe and show them in the Dagster UI."""

import base64
import tempfile
from pathlib import Path
from typing import Callable

import dagster as dg

from spatial_assets.storage.stores import asset_key


def plots_prefix(asset: str, partition: str) -> str:
    """Plots live beside the object they describe: ``assets/<asset>/<partition>.plots/``."""
    return asset_key(asset, partition, ".plots")


def md_table(headers: list[str], rows) -> dg.MetadataValue:
    """A small markdown table for the UI's metadata panel."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def attach_plots(store, key_prefix: str, make: Callable[[Path], dict], log) -> dict:
    """Run ``make(out_dir) -> {name: png_path}``, upload each PNG and return metadata entries.

    Plots are optional: any failure is logged and yields no metadata, never a failed asset.
    """
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = make(Path(tmp)) or {}
        except Exception as exc:  # plots must never break the computation
            log.warning(f"plots skipped: {exc!r}")
            return out
        for name, path in sorted(paths.items()):
            path = Path(path)
            if not path.exists():
                continue
            key = f"{key_prefix}/{path.name}"
            try:
                store.put_file(path, key)
            except Exception as exc:
                log.warning(f"could not store plot {name}: {exc!r}")
                continue
            data = base64.b64encode(path.read_bytes()).decode()
            out[f"plot_{name}"] = dg.MetadataValue.md(f"![{name}](data:image/png;base64,{data})\n\n`{store.uri(key)}`")
    return out
