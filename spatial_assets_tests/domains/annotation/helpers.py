"""Data the domain-annotation tests share: bundled file paths and a constructed 3-domain tissue."""

from __future__ import annotations


import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp



def _synthetic(seed: int = 0) -> ad.AnnData:
    """4 cell types (A-D, 5 marker genes each, + 20 background genes) in 3 domains:
    X = A and B mixed half/half, Y = C only, Z = D only. Raw Poisson counts."""
    rng = np.random.default_rng(seed)
    types = np.array(["A"] * 150 + ["B"] * 150 + ["C"] * 200 + ["D"] * 200)
    domain = np.array(["X"] * 300 + ["Y"] * 200 + ["Z"] * 200)
    genes = [f"{t}{i}" for t in "ABCD" for i in range(5)] + [f"bg{i}" for i in range(20)]
    rate = np.full((len(types), len(genes)), 2.0)
    for k, t in enumerate("ABCD"):
        rate[types == t, k * 5:(k + 1) * 5] = 20.0
    x = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"cell_type": types, "domain": pd.Categorical(domain)},
                       index=[f"c{i}" for i in range(len(types))])
    a = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(len(types), 2))
    return a


SYN_SIGNATURES = {t: [f"{t}{i}" for i in range(5)] for t in "ABCD"}
