"""Load tabular data (CSV, Parquet, ``.npy``) into typed columns.

A column whose non-empty values all parse as numbers is numeric (``int64`` when they
are all integers and none is missing, else ``float64``); any other column is categorical
(strings). Empty cells are missing. The column types found here define the bundle's
input schema.

``.npy`` files are loaded with ``allow_pickle=False``: a data file never runs code.
Parquet needs pyarrow (an optional install). This module does not know about models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packager.errors import DataError

__all__ = ["Table", "load_table"]

MAX_COLUMNS = 4096


@dataclass
class Table:
    """Columns by name, in file order. Numeric: float64 with NaN; categorical: object."""

    path: Path
    columns: dict[str, np.ndarray]
    kinds: dict[str, str]  # numeric | categorical
    dtypes: dict[str, str]  # float64 | int64 | string
    sha256: str
    target: np.ndarray | None = None
    target_name: str | None = None
    names: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def select(self, names: list[str]) -> Table:
        """A table with only ``names`` as features, in that order.

        Raises:
            DataError: a name is not a column of the file.
        """
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DataError(f"{self.path}: column(s) {', '.join(map(repr, missing))} that the "
                            f"model expects are not in the data (it has "
                            f"{', '.join(self.names[:12])}{'…' if len(self.names) > 12 else ''})")
        return Table(self.path, {n: self.columns[n] for n in names},
                     {n: self.kinds[n] for n in names}, {n: self.dtypes[n] for n in names},
                     self.sha256, self.target, self.target_name, list(names))

    def take(self, index: np.ndarray) -> Table:
        return Table(self.path, {n: c[index] for n, c in self.columns.items()}, self.kinds,
                     self.dtypes, self.sha256,
                     None if self.target is None else self.target[index], self.target_name,
                     self.names)

    def frame(self):
        """A pandas DataFrame of the features (what sklearn models trained on frames need).

        A missing categorical cell is NaN, as ``pandas.read_csv`` gives it to the model
        at training time: scikit-learn's imputers take NaN for missing but not None.
        """
        import pandas as pd

        cols = {n: np.array([np.nan if v is None else v for v in c.tolist()], dtype=object)
                if self.kinds[n] == "categorical" else c for n, c in self.columns.items()
                if n in self.names}
        return pd.DataFrame({n: cols[n] for n in self.names}, columns=self.names)

    def matrix(self) -> np.ndarray:
        """The numeric features as a float64 2-D array (all features must be numeric)."""
        cats = [n for n in self.names if self.kinds[n] != "numeric"]
        if cats:
            raise DataError(f"{self.path}: column {cats[0]!r} is categorical; the model needs "
                            "a pipeline that encodes it")
        return np.column_stack([self.columns[n].astype(np.float64) for n in self.names])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _typed(name: str, values: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Classify a column and convert it: (values, kind, dtype)."""
    if values.dtype.kind in "iub":
        return values.astype(np.float64), "numeric", "int64"
    if values.dtype.kind == "f":
        col = values.astype(np.float64)
        finite = col[np.isfinite(col)]
        integral = finite.size == col.size and bool(np.all(finite == np.round(finite)))
        return col, "numeric", "int64" if integral and finite.size else "float64"
    obj = values.astype(object)
    missing = np.array([v is None or (isinstance(v, float) and v != v) or
                        (isinstance(v, str) and v.strip() == "") for v in obj.tolist()],
                       dtype=bool)
    try:
        parsed = np.array([np.nan if m else float(v) for v, m in zip(obj, missing, strict=True)],
                          dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([None if m else str(v) for v, m in zip(obj, missing, strict=True)],
                       dtype=object)
        return out, "categorical", "string"
    return _typed(name, parsed)


def load_table(path: Path, target: str | None = None) -> Table:
    """Read a data file; ``target`` (a column name) is split off as the label.

    The reader's checks run in the order a file fails them (exists, format, columns,
    rows, target), each with its own message.

    Raises:
        DataError: unreadable file, unknown format, no rows, unknown target column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    raw = _read_columns(path)
    if not raw:
        raise DataError(f"{path}: no columns")
    if len(raw) > MAX_COLUMNS:
        raise DataError(f"{path}: {len(raw)} columns; at most {MAX_COLUMNS} are supported")
    if len(next(iter(raw.values()))) == 0:
        raise DataError(f"{path}: no rows")
    target_values = None
    if target is not None:
        if target not in raw:
            raise DataError(f"{path}: target column {target!r} not found (columns: "
                            f"{', '.join(list(raw)[:12])})")
        target_values = raw.pop(target)
        if target_values.dtype == object:
            target_values = target_values.astype(str)
    columns, kinds, dtypes = {}, {}, {}
    for name, values in raw.items():
        columns[name], kinds[name], dtypes[name] = _typed(name, values)
    return Table(path, columns, kinds, dtypes, _sha256_file(path), target_values, target,
                 list(columns))


def _read_columns(path: Path) -> dict[str, np.ndarray]:
    """The file's columns by name, read by its suffix (CSV, Parquet, 2-D .npy).

    Raises:
        DataError: an unknown format, or a file its reader refuses.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".txt", ".gz"):
            import pandas as pd

            # round_trip: pandas < 3's default parser is off by an ulp on some values,
            # and the schema's ranges and the reference must be the file's exact numbers
            frame = pd.read_csv(path, keep_default_na=True, low_memory=False,
                                float_precision="round_trip")
            return {str(c): frame[c].to_numpy() for c in frame.columns}
        if suffix in (".parquet", ".pq"):
            try:
                import pandas as pd
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise DataError(f"{path}: reading Parquet needs pyarrow "
                                "(pip install pyarrow)") from exc
            frame = pd.read_parquet(path)
            return {str(c): frame[c].to_numpy() for c in frame.columns}
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 2:
                raise DataError(f"{path}: a .npy data file must be 2-D, got shape {arr.shape}")
            return {f"x{i}": arr[:, i] for i in range(arr.shape[1])}
        raise DataError(f"{path}: unknown data format {suffix!r} "
                        "(use .csv, .parquet or .npy)")
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # pandas' parser raises its own tree
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
