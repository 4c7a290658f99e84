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


def _plain(value: Any) -> Any:
    """A TableRecord value: str/int/float/bool (numpy scalars unwrapped, NaN kept as float)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def table_value(df: pd.DataFrame) -> dg.MetadataValue:
    """A small DataFrame as a Dagster table (rendered as a table in the UI's metadata panel)."""
    types = {"b": "bool", "i": "int", "u": "int", "f": "float"}
    columns = [dg.TableColumn(name=str(c), type=types.get(df[c].dtype.kind, "string")) for c in df.columns]
    records = [dg.TableRecord({str(c): _plain(v) for c, v in row.items()}) for row in df.to_dict("records")]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))
