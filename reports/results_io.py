"""Read and write results tables as parquet files stamped with a results schema version.

`write_results` stores the schema version and the mmalign version in the parquet
key-value metadata, and `read_results` rejects a file with another schema version, no
version, or missing columns, naming the file and the fix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.reports.results_frame import ERROR_COLUMN, KEY_COLUMNS, REQUIRED_COLUMNS

logger = logging.getLogger("mmalign.reports")

# Raise this when a column is added, removed or changes meaning, so that old files are
# rejected with a clear message instead of being misread.
RESULTS_SCHEMA_VERSION = 1

SCHEMA_VERSION_KEY = b"mmalign.results_schema_version"
MMALIGN_VERSION_KEY = b"mmalign.version"

_RERUN_HINT = "Re-run `mmalign evaluate` to write it again."


class ResultsFormatError(ValueError):
    """A results file is missing, unreadable, from another schema version, or lacks columns."""


def mmalign_version() -> str:
    """Return the installed mmalign version, or "unknown" when it is not installed."""
    try:
        return version("mmalign")
    except PackageNotFoundError:
        return "unknown"


def write_results(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a results table as parquet through a temporary file and `os.replace`.

    A reader sees either the old file or the complete new one. The parquet key-value
    metadata stores `RESULTS_SCHEMA_VERSION` and the mmalign version.

    Args:
        frame: Results table with the columns in `REQUIRED_COLUMNS`, and optionally
            `error` and others. The index is not stored.
        path: Destination file. Missing parent directories are created.

    Raises:
        ValueError: If `frame` lacks required columns.
        OSError: If writing or renaming fails. No temporary file is left behind.
    """
    path = Path(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"cannot write results to {path}: missing required columns {', '.join(missing)}")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[SCHEMA_VERSION_KEY] = str(RESULTS_SCHEMA_VERSION).encode()
    metadata[MMALIGN_VERSION_KEY] = mmalign_version().encode()
    table = table.replace_schema_metadata(metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        pq.write_table(table, temp_name)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %d result rows to %s", len(frame), path)


def read_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a results file written by `write_results`.

    Args:
        path: A parquet results file.

    Returns:
        The results table.

    Raises:
        ResultsFormatError: If the file is missing, is a directory, is not parquet, has
            no results schema version or another one, or lacks required columns. The
            message names the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsFormatError(
            f"{path} is a directory, not a results file. Pass its results.parquet, or pass the run "
            "directory to `mmalign report`."
        )
    if not path.exists():
        raise ResultsFormatError(f"results file {path} not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise ResultsFormatError(f"{path} is not a readable parquet file: {error}") from error

    metadata = schema.metadata or {}
    written_by = metadata.get(MMALIGN_VERSION_KEY, b"an unknown version").decode("utf-8", "replace")
    stored = metadata.get(SCHEMA_VERSION_KEY)
    if stored is None:
        raise ResultsFormatError(
            f"{path} has no results schema version in its parquet metadata, so it was written by "
            f"another tool or by mmalign before results schema v1. This mmalign reads "
            f"v{RESULTS_SCHEMA_VERSION}. {_RERUN_HINT}"
        )
    stored_version = stored.decode("utf-8", "replace")
    if stored_version != str(RESULTS_SCHEMA_VERSION):
        raise ResultsFormatError(
            f"{path} was written by mmalign {written_by} with results schema v{stored_version}; "
            f"this mmalign reads v{RESULTS_SCHEMA_VERSION}. {_RERUN_HINT}"
        )
    missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
    if missing:
        raise ResultsFormatError(f"{path} is missing required columns: {', '.join(missing)}. {_RERUN_HINT}")

    try:
        frame = pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise ResultsFormatError(f"{path} could not be read: {error}") from error
    logger.info("read %d result rows from %s (written by mmalign %s)", len(frame), path, written_by)
    return frame


def read_many(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Read several results files with `read_results` and concatenate them.

    Args:
        paths: Results files, at least one.

    Returns:
        The rows of every file, in file order. Columns missing from some files, such as
        `error`, are NaN there.

    Raises:
        ResultsFormatError: If `paths` is empty, a file fails `read_results`, or two files
            contain a row with the same checkpoint, treatment, layer, token group and metric.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ResultsFormatError("no results files were given. Pass at least one results.parquet file.")
    frames = [read_results(path) for path in paths]
    sources = [str(path) for path in paths]
    combined = pd.concat(
        [frame.assign(_source=index) for index, frame in enumerate(frames)], ignore_index=True, sort=False
    )

    keyed = combined
    if ERROR_COLUMN in combined.columns:
        errors = combined[ERROR_COLUMN]
        keyed = combined[errors.isna() | (errors.astype(str).str.strip() == "")]
    repeated = keyed[keyed.duplicated(subset=list(KEY_COLUMNS), keep=False)]
    across_files = repeated.groupby(list(KEY_COLUMNS), dropna=False)["_source"].nunique()
    across_files = across_files[across_files > 1]
    if not across_files.empty:
        key = dict(zip(KEY_COLUMNS, across_files.index[0]))
        files = sorted({sources[index] for index in repeated.loc[_rows_with_key(repeated, key), "_source"]})
        described = ", ".join(f"{column}={value!r}" for column, value in key.items())
        raise ResultsFormatError(
            f"{' and '.join(files)} both contain results for {described}. Give each run's checkpoints "
            "distinct names, or report the runs separately."
        )
    return combined.drop(columns="_source")


def _rows_with_key(frame: pd.DataFrame, key: dict[str, object]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in key.items():
        mask &= frame[column] == value
    return mask
