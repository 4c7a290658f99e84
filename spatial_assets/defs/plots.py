"""Figures that travel with an asset's value, and small markdown helpers for the Dagster UI.

An asset that has plots returns ``WithFigures(value, figures)``; the IO manager stores the value
as usual and each PNG beside it (``<object>.plots/<name>.png``), and shows a thumbnail of each in
the materialization metadata. Asset code never writes into the IO manager's area itself.
Plots are optional: :func:`render_figures` turns any plotting failure into a warning and no
figures, and a figure that cannot be stored is skipped by the IO manager with a warning.
"""

import base64
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dagster as dg

#: thumbnails in the metadata panel: wide enough to read, small enough for the event log
THUMBNAIL_WIDTH = 600


@dataclass(frozen=True)
class WithFigures:
    """An asset value plus PNG figures describing it (``{name: png bytes}``)."""

    value: Any
    figures: dict[str, bytes] = field(default_factory=dict)


def render_figures(make: Callable[[Path], dict], log: Any) -> dict[str, bytes]:
    """Run ``make(out_dir) -> {name: png_path}`` and return ``{name: png bytes}``; never raises."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = make(Path(tmp)) or {}
            return {name: Path(p).read_bytes() for name, p in sorted(paths.items()) if p is not None and Path(p).exists()}
        except Exception as exc:  # plots must never break the computation
            log.warning(f"plots skipped: {exc!r}")
            return {}


def thumbnail_png(png: bytes, width: int = THUMBNAIL_WIDTH) -> bytes:
    """The PNG scaled down to at most ``width`` pixels wide (aspect kept); unchanged if narrower."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        if img.width <= width:
            return png  # already small: shown as it is
        height = max(1, round(img.height * width / img.width))
        small = img.convert("RGBA").resize((width, height), Image.Resampling.LANCZOS)
        # a 256-colour palette keeps plots legible at a fraction of the bytes (they live in the event log)
        small = small.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        out = io.BytesIO()
        small.save(out, format="PNG", optimize=True)
        return out.getvalue()


def figure_markdown(name: str, png: bytes, uri: str) -> dg.MetadataValue:
    """A thumbnail (inline base64 PNG) with where the full-size figure is stored."""
    data = base64.b64encode(thumbnail_png(png)).decode()
    return dg.MetadataValue.md(f"![{name}](data:image/png;base64,{data})\n\nfull size: `{uri}`")


def md_table(headers: list[str], rows) -> dg.MetadataValue:
    """A small markdown table for the UI's metadata panel."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))
