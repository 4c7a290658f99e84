"""Gene panels (no Dagster): which genes a sample measures, named by a stable hash.

Studies use different panels, and a model trained for one cannot annotate another. The platform
therefore trains one model per panel: a panel is the sorted set of a sample's measured genes
(control probes removed, see :func:`spatial_assets.core.spatial.panel_genes`), and its id is
``p-`` + the first 12 hex digits of the sha256 of that sorted list. The id depends on the genes
only — not on their order, the sample, or when it landed — so two slices of one study share a
panel (and a model), and a sample measuring other genes gets its own.

``settings.panel_genes`` (an operator override) puts every sample on the configured panel
instead; a sample that lacks one of those genes is then refused by the gene-overlap check
rather than annotated with a zero-filled gene.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import anndata as ad

from spatial_assets.core.ids import InvalidIdError, validate_id
from spatial_assets.core.spatial import panel_genes

PANEL_ID_RE = re.compile(r"^p-[0-9a-f]{12}$")
#: how many gene names a readable panel name shows
NAME_GENES = 3
SOURCE_SAMPLE = "sample"
SOURCE_CONFIGURED = "configured"


class PanelError(ValueError):
    """A gene list that cannot define a panel (names the sample or the setting)."""


def panel_id(genes: Iterable[str]) -> str:
    """``p-<12 hex>``: sha256 of the sorted, de-duplicated gene names joined by newlines."""
    unique = sorted({str(g) for g in genes})
    if not unique:
        raise PanelError("a panel needs at least one gene")
    digest = hashlib.sha256("\n".join(unique).encode()).hexdigest()
    return f"p-{digest[:12]}"


def validate_panel_id(value: str) -> str:
    """A panel id as :func:`panel_id` makes it (also a valid partition / storage key)."""
    validate_id(value, "panel id")
    if not PANEL_ID_RE.match(value):
        raise InvalidIdError(f"invalid panel id {value!r}: expected 'p-' and 12 lowercase hex digits")
    return value


def panel_name(genes: Sequence[str]) -> str:
    """Readable, deterministic name: gene count and the first genes in sorted order."""
    unique = sorted({str(g) for g in genes})
    head = ", ".join(unique[:NAME_GENES])
    return f"{len(unique)} genes ({head}{', …' if len(unique) > NAME_GENES else ''})"


@dataclass(frozen=True)
class Panel:
    id: str
    name: str
    genes: tuple[str, ...]  # sorted
    source: str = SOURCE_SAMPLE  # "sample" (the sample's own genes) | "configured" (settings.panel_genes)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def from_genes(cls, genes: Iterable[str], source: str = SOURCE_SAMPLE) -> "Panel":
        unique = tuple(sorted({str(g) for g in genes}))
        return cls(id=panel_id(unique), name=panel_name(unique), genes=unique, source=source)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Panel":
        genes = tuple(str(g) for g in record["genes"])
        panel = cls.from_genes(genes, source=str(record.get("source", SOURCE_SAMPLE)))
        if panel.id != record["panel_id"]:
            raise PanelError(f"panel record {record['panel_id']!r}: its genes hash to {panel.id!r}")
        return panel

    def to_record(self) -> dict[str, Any]:
        return {"panel_id": self.id, "panel_name": self.name, "n_genes": self.n_genes,
                "genes": list(self.genes), "source": self.source}


def sample_panel(adata: ad.AnnData, configured: Sequence[str] = (), *, sample_id: str = "sample") -> Panel:
    """The panel ``adata`` is annotated with: ``configured`` genes if given, else its own genes."""
    if configured:
        return Panel.from_genes(configured, source=SOURCE_CONFIGURED)
    genes = panel_genes(adata)
    if not genes:
        raise PanelError(f"sample {sample_id!r}: no genes left after removing control probes")
    return Panel.from_genes(genes, source=SOURCE_SAMPLE)


def missing_genes(required: Iterable[str], measured: Iterable[str]) -> list[str]:
    """Genes of ``required`` (in its order) that ``measured`` lacks."""
    have = set(measured)
    return [g for g in required if g not in have]
