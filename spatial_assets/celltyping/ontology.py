"""Map free-text reference labels to Cell Ontology (CL) terms.

Why: references name the same cell type differently ("Macrophages", "macrophage", "Mac"), so
training classes are keyed on CL terms; labels that cannot be mapped confidently stay their own
class rather than being merged into one "Unknown" bucket (which would teach a classifier a
meaningless mixture).

The ontology comes from `cellxgene-ontology-guide`, which ships CL as a zstd JSON file inside
the wheel and reads it from disk (`CXGSchema.ontology` → `load_ontology_file`); no code path
used here touches the network.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from spatial_assets.core import schema
from spatial_assets.core.sharing import share_matrices

TIERS = ("exact", "synonym", "pattern", "token", "unmapped")
NATIVE_TIER = "native"
MANUAL_TIER = "manual"
TIER_SCORES = {
    "exact": 1.0, "synonym": 0.95, "pattern": 0.9, "native": 1.0, "manual": 1.0, "unmapped": 0.0
}
# token-tier score = TOKEN_SCALE × similarity, so a token match always ranks below curated tiers
TOKEN_SCALE = 0.85
_CL_ID = re.compile(r"^CL:\d{7}$")
_STOPWORDS = frozenset({"cell", "of", "the", "and", "a", "an", "in", "type", "or"})


class OntologyError(ValueError):
    """Bad input to ontology mapping (missing column, empty label, ...)."""


@dataclass(frozen=True)
class OntologyMatch:
    label: str
    ontology_term_id: str | None
    ontology_label: str | None
    tier: str
    score: float


@dataclass(frozen=True)
class _ClIndex:
    version: str
    labels: dict[str, str]  # id -> label (non-deprecated CL only)
    depth: dict[str, int]  # id -> number of ancestors (smaller = more general)
    by_label: dict[str, str]  # normalised label -> id
    by_synonym: dict[str, str]  # normalised synonym -> id (deterministic winner)
    docs: tuple[tuple[str, frozenset[str]], ...]  # (id, token set) per label/synonym
    idf: dict[str, float]
    max_idf: float


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _singular(word: str) -> str:
    # crude but symmetric: applied to both the query and the ontology text
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _tokens(text: str) -> frozenset[str]:
    text = re.sub(r"([a-z0-9])\+", r"\1 positive", _norm(text))
    text = re.sub(r"([a-z0-9])-(?=\s|$|,)", r"\1 negative", text)
    return frozenset(
        _singular(w) for w in re.findall(r"[a-z0-9]+", text) if _singular(w) not in _STOPWORDS
    )


@functools.lru_cache(maxsize=1)
def _index() -> _ClIndex:
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    cxg = CXGSchema()
    raw = cxg.ontology("CL")
    version = str(cxg.supported_ontologies["CL"]["version"])
    terms = {
        tid: meta
        for tid, meta in raw.items()
        if _CL_ID.match(tid) and not meta.get("deprecated", False)
    }
    labels = {tid: meta["label"] for tid, meta in terms.items()}
    depth = {tid: len(meta.get("ancestors", {})) for tid, meta in terms.items()}

    def better(a: str, b: str) -> str:
        # several terms sharing a name: prefer the more general one, then the lower id
        return min(a, b, key=lambda t: (depth[t], t))

    by_label: dict[str, str] = {}
    by_synonym: dict[str, str] = {}
    docs: list[tuple[str, frozenset[str]]] = []
    for tid in sorted(terms):
        key = _norm(labels[tid])
        by_label[key] = better(by_label[key], tid) if key in by_label else tid
        docs.append((tid, _tokens(labels[tid])))
        for syn in terms[tid].get("synonyms", []) or []:
            skey = _norm(syn)
            by_synonym[skey] = better(by_synonym[skey], tid) if skey in by_synonym else tid
            docs.append((tid, _tokens(syn)))
    df: dict[str, int] = defaultdict(int)
    for _, toks in docs:
        for t in toks:
            df[t] += 1
    n = len(docs)
    idf = {t: math.log((n + 1) / (c + 1)) + 1.0 for t, c in df.items()}
    return _ClIndex(
        version=version,
        labels=labels,
        depth=depth,
        by_label=by_label,
        by_synonym=by_synonym,
        docs=tuple(docs),
        idf=idf,
        max_idf=math.log(n + 1) + 1.0,
    )


def cl_version() -> str:
    """Version of the bundled Cell Ontology, recorded so a mapping table can be reproduced."""
    return _index().version


# Anchored patterns on the normalised label (and its de-pluralised variants) -> CL id.
# Ids, not labels, so a renamed term still resolves; every id is checked against the index.
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"naive cd4(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000895"),
    (r"memory cd4(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000897"),
    (r"naive cd8(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000900"),
    (r"memory cd8(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000909"),
    (r"cd4(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000624"),
    (r"cd8(?:\+|-positive)?(?: alpha-beta)? t(?: cell| lymphocyte)?", "CL:0000625"),
    (r"t(?:-| )?regs?|regulatory t(?: cell)?", "CL:0000815"),
    (r"nk(?: cell)?|natural killer(?: cell)?", "CL:0000623"),
    (r"b(?: cell| lymphocyte)?", "CL:0000236"),
    (r"t(?: cell| lymphocyte)?", "CL:0000084"),
    (r"cd14(?:\+|-positive)? mono(?:cyte)?", "CL:0001054"),
    (r"(?:fcgr3a|cd16)(?:\+|-positive)? mono(?:cyte)?", "CL:0002396"),
    (r"mono(?:cyte)?", "CL:0000576"),
    (r"pdcs?|plasmacytoid dendritic(?: cell)?", "CL:0000784"),
    (r"cdcs?|conventional dendritic(?: cell)?", "CL:0000990"),
    (r"dcs?|dendritic(?: cell)?", "CL:0000451"),
    (r"mac|macro|macrophage", "CL:0000235"),
    (r"astro|astrocyte", "CL:0000127"),
    (r"microglia|microglial(?: cell)?|micro", "CL:0000129"),
    (r"opcs?|oligodendrocyte (?:precursor|progenitor)(?: cell)?", "CL:0002453"),
    (r"oligo|oligodendrocyte|ols?", "CL:0000128"),
    (r"endo|endothelial(?: cell)?|endothelium", "CL:0000115"),
    (r"fibro|fibroblast", "CL:0000057"),
    (r"ependymal(?: cell)?|ependyma", "CL:0000065"),
    (r"(?:excitatory|glutamatergic|exc)(?: neuron)?", "CL:0000679"),
    (r"(?:inhibitory|gabaergic|inh)(?: neuron)?", "CL:0000617"),
    (r"mural(?: cell)?", "CL:0008034"),
    (r"pericyte|peri", "CL:0000669"),
    (r"smcs?|smooth muscle(?: cell)?", "CL:0000192"),
    (r"vlmcs?", "CL:4023051"),
    (r"platelet", "CL:0000233"),
    (r"rbcs?|erythrocyte|red blood(?: cell)?", "CL:0000232"),
    (r"plasma(?: cell)?|plasmablast", "CL:0000786"),
    (r"neuron", "CL:0000540"),
)
_COMPILED = tuple((re.compile(rf"^(?:{p})$"), tid) for p, tid in _PATTERNS)


def _variants(norm: str) -> list[str]:
    """Plural/suffix variants tried by the pattern tier: 'X cells'→'X cell'/'X', 'Xs'→'X'."""
    out = [norm]
    words = norm.split(" ")
    last = words[-1]
    if last == "cells":
        out += [" ".join(words[:-1] + ["cell"]), " ".join(words[:-1])]
    elif last == "cell":
        out.append(" ".join(words[:-1]))
    else:
        sing = _singular(last)
        if sing != last:
            out.append(" ".join(words[:-1] + [sing]))
    for v in list(out):
        if v and not v.endswith(" cell"):
            out.append(v + " cell")
    seen: list[str] = []
    for v in out:
        if v and v not in seen:
            seen.append(v)
    return seen


def _match(label: str, tier: str, tid: str, score: float) -> OntologyMatch:
    return OntologyMatch(label, tid, _index().labels[tid], tier, score)


def _token_match(label: str, min_token_score: float) -> OntologyMatch | None:
    """IDF-weighted Jaccard against every label and synonym.

    A candidate is rejected when it drops a query word the ontology itself uses (e.g.
    "immature" in "Immature oligodendrocyte" → "oligodendrocyte"): that would silently
    collapse a label onto a broader term and merge classes its reference keeps apart.
    Words CL never uses (typos, cluster numbers) only lower the score.
    """
    idx = _index()
    q = _tokens(label)
    if not q:
        return None
    known = {t for t in q if t in idx.idf}
    w = lambda t: idx.idf.get(t, idx.max_idf)  # noqa: E731
    best: tuple[float, int, str] | None = None
    for tid, d in idx.docs:
        inter = q & d
        if not inter or not known <= d:
            continue
        sim = sum(w(t) for t in inter) / sum(w(t) for t in q | d)
        key = (-sim, idx.depth[tid], tid)
        if best is None or key < best:
            best = key
    if best is None or -best[0] < min_token_score:
        return None
    return _match(label, "token", best[2], round(TOKEN_SCALE * -best[0], 4))


def _check_overrides(overrides: Mapping[str, str | None] | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lab, tid in (overrides or {}).items():
        if tid in (None, schema.UNASSIGNED_ONTOLOGY_ID):
            out[_norm(lab)] = None
        elif is_cl_id(tid):
            out[_norm(lab)] = tid
        else:
            raise OntologyError(
                f"override for label {lab!r}: {tid!r} is not a current CL id of CL {cl_version()}"
            )
    return out


def map_label(
    label: str,
    *,
    min_token_score: float = 0.5,
    overrides: Mapping[str, str | None] | None = None,
) -> OntologyMatch:
    """Map one free-text label to a CL term, trying tiers from most to least certain.

    `overrides` (label → CL id, or None/"unknown" to force unmapped) lets a curator fix a
    mapping the rules get wrong; matched case-insensitively, reported as tier "manual".
    """
    if not isinstance(label, str) or not label.strip():
        raise OntologyError(f"cannot map an empty or non-string cell type label: {label!r}")
    idx = _index()
    norm = _norm(label)
    manual = _check_overrides(overrides)
    if norm in manual:
        if manual[norm] is None:
            return OntologyMatch(label, None, None, "unmapped", 0.0)
        return _match(label, MANUAL_TIER, manual[norm], TIER_SCORES[MANUAL_TIER])
    if norm in idx.by_label:
        return _match(label, "exact", idx.by_label[norm], TIER_SCORES["exact"])
    if norm in idx.by_synonym:
        return _match(label, "synonym", idx.by_synonym[norm], TIER_SCORES["synonym"])
    variants = _variants(norm)
    for v in variants:
        for rx, tid in _COMPILED:
            if rx.match(v) and tid in idx.labels:
                return _match(label, "pattern", tid, TIER_SCORES["pattern"])
    for v in variants[1:]:
        tid = idx.by_label.get(v) or idx.by_synonym.get(v)
        if tid is not None:
            return _match(label, "pattern", tid, TIER_SCORES["pattern"])
    hit = _token_match(label, min_token_score)
    if hit is not None:
        return hit
    return OntologyMatch(label, None, None, "unmapped", 0.0)


def map_labels(labels: Iterable[str], **kw: Any) -> pd.DataFrame:
    """Mapping table, one row per distinct label (first-seen order): what callers persist."""
    uniq = list(dict.fromkeys(labels))
    rows = [asdict(map_label(lab, **kw)) for lab in uniq]
    cols = ["label", "ontology_term_id", "ontology_label", "tier", "score"]
    return pd.DataFrame(rows, columns=cols)


def is_cl_id(term_id: object) -> bool:
    """True for a current (non-deprecated) CL id of the bundled ontology."""
    return isinstance(term_id, str) and term_id in _index().labels


def apply_ontology(
    adata: AnnData,
    *,
    label_column: str = schema.ORIGINAL_LABEL,
    existing_id_column: str = schema.CELL_TYPE_ONTOLOGY_ID,
    **kw: Any,
) -> tuple[AnnData, pd.DataFrame]:
    """Return a new AnnData with ontology-keyed training classes, plus the audit table.

    The new object's obs/var/uns are its own; X and layers are the input's arrays (not copied).

    `cell_type` is the CL label when mapped (so "Macrophages" and "macrophage" from two
    references become one class) and the original label otherwise (unmapped labels stay
    distinct). A valid CL id already present in `existing_id_column` wins (tier "native").
    The table has one row per (reference_source, label, term id, tier) with `n_cells`.
    """
    if label_column not in adata.obs.columns:
        raise OntologyError(
            f"obs column {label_column!r} (cell type labels) not found; "
            f"available: {list(adata.obs.columns)}"
        )
    raw = adata.obs[label_column]
    bad = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    if bad.any():
        raise OntologyError(
            f"obs column {label_column!r} has {int(bad.sum())} missing/empty labels "
            f"(first at obs_name {adata.obs_names[np.flatnonzero(bad)[0]]!r})"
        )
    idx = _index()
    # work per distinct (label, native id) pair, not per cell: millions of cells, few labels
    lab_codes, lab_uniq = pd.factorize(raw)
    lab_names = [str(v) for v in lab_uniq]
    table = map_labels(lab_names, **kw).set_index("label")
    if existing_id_column in adata.obs.columns:
        nat_codes, nat_uniq = pd.factorize(adata.obs[existing_id_column])
        nat_valid = np.array([is_cl_id(v) for v in nat_uniq] + [False], dtype=bool)  # [-1] → NaN
        nat_codes = np.where(nat_valid[nat_codes], nat_codes, -1)
    else:
        nat_codes, nat_uniq = np.full(adata.n_obs, -1, dtype=np.int64), []
    pair = lab_codes.astype(np.int64) * (len(nat_uniq) + 1) + (nat_codes + 1)
    pair_codes, pair_uniq = pd.factorize(pair)

    rows = []
    for key in pair_uniq:
        lab = lab_names[key // (len(nat_uniq) + 1)]
        nat = key % (len(nat_uniq) + 1) - 1
        if nat >= 0:
            tid = str(nat_uniq[nat])
            rows.append((lab, tid, idx.labels[tid], NATIVE_TIER, TIER_SCORES[NATIVE_TIER]))
        else:
            m = table.loc[lab]
            rows.append((lab, m["ontology_term_id"], m["ontology_label"], m["tier"], float(m["score"])))
    per = pd.DataFrame(rows, columns=["label", "ontology_term_id", "ontology_label", "tier", "score"])
    mapped = per["ontology_term_id"].notna()
    per["cell_type"] = per["ontology_label"].where(mapped, per["label"])
    per["ontology_term_id"] = per["ontology_term_id"].where(mapped, schema.UNASSIGNED_ONTOLOGY_ID)
    per["ontology_label"] = per["ontology_label"].where(mapped, schema.UNASSIGNED_ONTOLOGY_LABEL)

    def column(name: str, categories: list[str] | None = None) -> pd.Categorical:
        cats = categories or sorted(set(per[name]))
        codes = pd.Categorical(per[name], categories=cats).codes
        return pd.Categorical.from_codes(codes[pair_codes], categories=cats)

    out = share_matrices(adata)  # only obs/uns change: the matrices are shared, not copied
    out.obs[schema.CELL_TYPE] = column("cell_type")
    out.obs[schema.CELL_TYPE_ONTOLOGY_ID] = column("ontology_term_id")
    out.obs[schema.CELL_TYPE_ONTOLOGY_LABEL] = column("ontology_label")
    out.obs["ontology_tier"] = column("tier", [*TIERS, NATIVE_TIER, MANUAL_TIER])
    out.obs["ontology_score"] = per["score"].to_numpy(dtype=np.float32)[pair_codes]
    out.uns["ontology"] = {"source": "Cell Ontology (cellxgene-ontology-guide)", "cl_version": idx.version}

    keys = ["label", "ontology_term_id", "ontology_label", "tier", "score", "cell_type"]
    if schema.REFERENCE_SOURCE in adata.obs.columns:
        src_codes, src_uniq = pd.factorize(adata.obs[schema.REFERENCE_SOURCE])
        combo = src_codes.astype(np.int64) * len(per) + pair_codes
        uniq, n_cells = np.unique(combo, return_counts=True)
        mapping = per.iloc[uniq % len(per)].reset_index(drop=True)
        mapping.insert(
            0,
            schema.REFERENCE_SOURCE,
            [str(src_uniq[c]) if c >= 0 else "nan" for c in uniq // len(per)],
        )
        keys = [schema.REFERENCE_SOURCE, *keys]
    else:
        uniq, n_cells = np.unique(pair_codes, return_counts=True)
        mapping = per.iloc[uniq].reset_index(drop=True)
    mapping["n_cells"] = n_cells
    mapping = mapping.sort_values(keys, kind="stable").reset_index(drop=True)
    return out, mapping
