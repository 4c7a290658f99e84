"""What every asset declares for the UI: owners, storage kind, table schema of parquet outputs.

``kinds`` carry ``s3`` because the default deployments (``local_s3``, ``s3``) store every object
in S3; the ``local`` deployment (files) keeps the same definitions.
"""

from typing import Any

import dagster as dg
import pandas as pd

OWNERS = ["team:spatial-platform"]
STORAGE_KIND = "s3"


def table_metadata(df: pd.DataFrame, *, partitioned: bool = True) -> dict[str, Any]:
    """``dagster/column_schema`` and ``dagster/row_count`` (+ partition row count) of a table output."""
    columns = [dg.TableColumn(name=str(name), type=str(dtype)) for name, dtype in df.dtypes.items()]
    meta: dict[str, Any] = {
        "dagster/column_schema": dg.TableSchema(columns=columns),
        "dagster/row_count": int(len(df)),
    }
    if partitioned:
        meta["dagster/partition_row_count"] = int(len(df))
    return meta
