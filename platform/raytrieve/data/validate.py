"""Check training datasets before any worker starts: the file exists and is readable, it
has rows, the configured columns exist with the types the loss needs, text columns have
no nulls, labels are present and numeric where the loss needs them.

Every error names the dataset, the file, the column and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from raytrieve.errors import DataError
from raytrieve.losses.base import column_count_fits, describe_column_count
from raytrieve.losses.registry import needs_labels, text_columns
from raytrieve.train.config import DatasetConfig, TrainConfig

LISTWISE = {"LambdaLoss", "RankNetLoss", "ListNetLoss", "ListMLELoss", "PListMLELoss"}
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


@dataclass
class DatasetReport:
    name: str
    path: str
    rows: int
    text_columns: list[str]
    label_column: str | None
    table: pa.Table | None = field(default=None, repr=False)  # what was read, for the planner


def infer_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise DataError(f"{path}: a directory that is neither a saved Hugging Face dataset nor parquet files")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the name; set format: parquet | jsonl | csv | hf")
    return fmt


def read_table(path: Path, fmt: str) -> pa.Table:
    """The whole dataset as an Arrow table (validation needs every row's nulls and types)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if fmt == "jsonl":
            import pyarrow.json as pj

            if path.stat().st_size == 0:
                return pa.table({})
            return pj.read_json(path)
        if fmt == "csv":
            import pyarrow.csv as pc

            if path.stat().st_size == 0:
                return pa.table({})
            return pc.read_csv(path)
        import datasets

        return datasets.load_from_disk(str(path)).data.table
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as {fmt} ({e}); check the file or set format:") from None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def validate_dataset(d: DatasetConfig, kind: str, where: str) -> DatasetReport:
    path = Path(d.path)
    if not path.exists():
        raise DataError(f"{where} ({d.name}): {path} does not exist; fix datasets[].path")
    fmt = d.format or infer_format(path)
    table = read_table(path, fmt)
    if table.num_rows == 0:
        raise DataError(f"{where} ({d.name}): {path} has no rows")
    available = table.column_names
    label = d.label_column
    if label is not None and label not in available:
        raise DataError(f"{where} ({d.name}): label_column {label!r} is not in {path}; columns are {available}")
    columns = list(d.columns) if d.columns is not None else [c for c in available if c != label]
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(f"{where} ({d.name}): column(s) {missing} not in {path}; columns are {available}")
    loss_name = d.loss.inner.name if d.loss.name == "SpladeLoss" and d.loss.inner else d.loss.name
    wanted = text_columns(d.loss, kind)
    if not column_count_fits(len(columns), wanted):
        raise DataError(
            f"{where} ({d.name}): {loss_name} takes {describe_column_count(wanted)} text column(s), "
            f"the dataset gives {len(columns)} {columns}; "
            "set datasets[].columns (and label_column) to pick them"
        )
    listwise = kind == "cross" and loss_name in LISTWISE
    for i, c in enumerate(columns):
        col_type = table.schema.field(c).type
        if listwise and i == 1:
            ok = pa.types.is_list(col_type) and _is_text(col_type.value_type)
            what = "a list of strings per row"
        else:
            ok, what = _is_text(col_type), "strings"
        if not ok:
            raise DataError(f"{where} ({d.name}): column {c!r} must hold {what}, found {col_type}")
        nulls = table.column(c).null_count
        if nulls:
            raise DataError(
                f"{where} ({d.name}): column {c!r} has {nulls} null value(s) in {path}; drop or fill those rows"
            )
    if needs_labels(d.loss):
        if label is None:
            raise DataError(f"{where} ({d.name}): {loss_name} needs labels; set datasets[].label_column")
        label_type = table.schema.field(label).type
        ok = (pa.types.is_list(label_type) and _is_number(label_type.value_type)) if listwise else (
            _is_number(label_type) or (pa.types.is_list(label_type) and _is_number(label_type.value_type))
        )
        if not ok:
            raise DataError(
                f"{where} ({d.name}): label column {label!r} must be numeric"
                f"{' lists (one score per document)' if listwise else ''}, found {label_type}"
            )
        if table.column(label).null_count:
            raise DataError(f"{where} ({d.name}): label column {label!r} has null values; drop or fill them")
    for c in d.router_mapping:
        if c not in columns:
            raise DataError(f"{where} ({d.name}): router_mapping names column {c!r}, not one of {columns}")
    if isinstance(d.prompts, dict):
        for c in d.prompts:
            if c not in columns:
                raise DataError(f"{where} ({d.name}): prompts names column {c!r}, not one of {columns}")
    return DatasetReport(d.name, str(path), table.num_rows, columns, label, table)


def validate_datasets(cfg: TrainConfig, where: str = "config") -> list[DatasetReport]:
    return [validate_dataset(d, cfg.model.kind, f"{where}.datasets[{i}]") for i, d in enumerate(cfg.datasets)]
