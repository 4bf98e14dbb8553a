"""Reading local data files (JSON lines, JSON, CSV, TSV, parquet) into datasets, and the words
for what is wrong in them.

Files are parsed here, not by `datasets.load_dataset`: its errors say "An error occurred while
generating the dataset" without the line, it logs to stderr, and it caches every file it reads.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from datasets.table import InMemoryTable

from peftlab.checkpoint import read_utf8
from peftlab.errors import PeftlabError, did_you_mean, first_line

SPLITS = ("train", "validation", "test")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

ID_COLUMNS = ("id", "idx")  # a column of row ids: duplicates mean a row was copied by mistake


def read_file(path: Path) -> Dataset:
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise PeftlabError(f"'{path}' has the unsupported format '{path.suffix}'; save it as "
                           f"{', '.join(FORMATS)}")
    if not path.is_file():
        raise PeftlabError(f"data file '{path}' does not exist; check the path")
    if kind == "parquet":
        ds = _read_parquet(path)
    else:
        text = read_utf8(path)
        if not text.strip():
            raise PeftlabError(f"'{path}' is empty; give a file with at least one row")
        ds = _from_rows(path, _json_rows(path, text)) if kind == "json" else _read_csv(path, text)
    if len(ds) == 0:
        raise PeftlabError(f"'{path}' has no rows; give a file with at least one row")
    _check_ids(ds, path)
    return ds


def json_kind(value) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _json_rows(path: Path, text: str) -> list[dict]:
    """The rows of a JSON-lines file, or of a .json file holding a list of objects."""
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            doc = None  # not one document: read it as JSON lines, which names the bad line
        if isinstance(doc, list):
            bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
            if bad is not None:
                raise PeftlabError(f"'{path}': item {bad + 1} of its list is a JSON {json_kind(doc[bad])}, not an object; "
                                   "give a list of objects, e.g. [{\"text\": \"...\", \"label\": \"...\"}]")
            return doc
        if isinstance(doc, dict):
            return [doc]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines end at \n only, not at U+2028 and kin
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise PeftlabError(f"line {n} of '{path}' is not valid JSON ({first_line(e)}); fix or remove that "
                               "line (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise PeftlabError(f"line {n} of '{path}' is a JSON {json_kind(row)}, not an object; write one object per "
                               "line, e.g. {\"text\": \"...\", \"label\": \"...\"}")
        rows.append(row)
    return rows


def _from_rows(path: Path, rows: list[dict]) -> Dataset:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    data = {c: [r.get(c) for r in rows] for c in columns}
    try:
        return Dataset.from_dict(data)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        for col, values in data.items():  # find the column arrow could not store
            try:
                pa.array(values)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as col_error:
                raise PeftlabError(f"column '{col}' of '{path}' {_column_problem(values, col_error)}; give every "
                                   "row's value the same type") from None
        raise PeftlabError(f"cannot read '{path}' ({first_line(e)}); check its rows") from None


def _column_problem(values: list, error: BaseException) -> str:
    first: dict[str, int] = {}
    for i, v in enumerate(values):
        if v is not None:
            first.setdefault(json_kind(v), i)
    if len(first) > 1:
        (a, i), (b, j) = list(first.items())[:2]
        return f"mixes {a} and {b} values (rows {i} and {j})"
    return f"holds values that cannot be stored ({first_line(error)})"


def _read_csv(path: Path, text: str) -> Dataset:
    tsv = path.suffix == ".tsv"
    try:
        # only an empty cell is missing: "NA", "null" or "nan" in a text column are words, not gaps
        df = pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", keep_default_na=False, na_values=[""])
        return Dataset.from_pandas(df, preserve_index=False)
    except Exception as e:  # pandas and arrow raise many types for malformed files
        raise PeftlabError(f"cannot read '{path}' as {path.suffix} ({first_line(e)}); check that every row has "
                           f"the header's fields, separated by {'tabs' if tsv else 'commas'}") from e


def _read_parquet(path: Path) -> Dataset:
    try:
        return Dataset(InMemoryTable(pq.read_table(path)))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PeftlabError(f"cannot read '{path}' as parquet ({first_line(e)}); re-export it, or give a .jsonl or "
                           ".csv file") from None


def _check_ids(ds: Dataset, path: Path) -> None:
    col = next((c for c in ID_COLUMNS if c in ds.column_names), None)
    if col is None:
        return
    seen: dict[str, int] = {}
    for i, v in enumerate(ds[col]):
        if v is None:
            continue
        key = json.dumps(v, sort_keys=True, default=str)
        if key in seen:
            raise PeftlabError(f"'{path}': {col} {v!r} is on rows {seen[key]} and {i}; ids must be unique: drop the "
                               f"duplicate row or give it its own {col}")
        seen[key] = i


def read_folder(folder: Path) -> dict[str, Dataset]:
    out = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
        if not found:
            raise PeftlabError(f"'{folder}' has no {split} file; add {split}.jsonl (or .csv/.tsv/.parquet) "
                               "beside the other splits")
        out[split] = read_file(found[0])
    return out


def split_one(ds: Dataset, seed: int) -> dict[str, Dataset]:
    if len(ds) < 10:
        raise PeftlabError(f"a single data file needs at least 10 rows to split 80/10/10, it has {len(ds)}; add "
                           "rows, or give a folder with train, validation and test files")
    order = np.random.default_rng(seed).permutation(len(ds))
    a, b = int(0.8 * len(ds)), int(0.9 * len(ds))
    return {"train": ds.select(order[:a]), "validation": ds.select(order[a:b]), "test": ds.select(order[b:])}


def missing_column(split: str, column: str, columns: list[str], flag: str) -> PeftlabError:
    """The error for a column a split lacks: its columns, the closest name, the flag to set."""
    hint = did_you_mean(column, columns)
    hint = hint + " " if hint else ""
    if len(columns) == 1 and ("," in columns[0] or "\t" in columns[0]):
        hint = "the header looks like one field: is the file's extension (.csv or .tsv) its delimiter? "
    return PeftlabError(f"{split} data has no column '{column}' (columns: {', '.join(columns) or 'none'}); "
                        f"{hint}name the right one with {flag}")


def value_kind(v) -> str:
    """What a cell holds, for messages: 'missing (null)', 'a number (3.5)'..."""
    if v is None:
        return "missing (null)"
    return "missing (an empty cell or NaN)" if is_missing(v) else f"a {json_kind(v)} ({short(v)})"


def short(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))  # CSV readers turn empty cells into NaN
