"""Classification tasks: built-in task specs, loading splits from disk (or the hub), subsets.

A task is found, in this order: a built-in name resolved under PEFTLAB_DATA, then under
`../shared/data` beside the repository, then on the Hugging Face hub (when online); or a local
.jsonl/.csv/.tsv/.parquet file, or a directory holding train/validation/test files.
"""

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset
from datasets.table import InMemoryTable

from peftlab.errors import PeftlabError, did_you_mean, first_line, unknown

SPLITS = ("train", "validation", "test")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    metric: str  # the validation metric that picks the best checkpoint
    text_column: str = "text"
    label_column: str = "label"
    hub: tuple[str, str | None, str] | None = None  # (path, config, its text column) when online
    template: str = "{text}"  # how a text is framed for label-word scoring and in-context learning
    words: tuple[str, ...] | None = None  # label words (verbalizers); default: the label names


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("negative", "positive"), "accuracy", hub=("stanfordnlp/sst2", None, "sentence"),
                     template="Review: {text}\nSentiment:"),
    "cola": TaskSpec("cola", ("unacceptable", "acceptable"), "mcc", hub=("nyu-mll/glue", "cola", "sentence"),
                     template="Sentence: {text}\nIs this sentence grammatically correct or incorrect? Answer:",
                     words=("incorrect", "correct")),
    # 13% spam: macro-F1 picks checkpoints that find spam, not ones that say "ham" to everything.
    "sms_spam": TaskSpec("sms_spam", ("ham", "spam"), "macro_f1", hub=("ucirvine/sms_spam", None, "sms"),
                         template="Message: {text}\nIs this message spam or ham? Answer:"),
    "amazon_reviews": TaskSpec("amazon_reviews", ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"),
                               "accuracy", hub=("mteb/amazon_reviews_multi", "en", "text"),
                               template="Review: {text}\nRating (1 to 5 stars):", words=("1", "2", "3", "4", "5")),
}


@dataclass
class Task:
    """A loaded classification task: label names, metric and the three splits (text, label ids)."""

    name: str
    labels: tuple[str, ...]
    metric: str
    splits: dict[str, Dataset] = field(repr=False)
    template: str = "{text}"
    words: tuple[str, ...] = ()  # label words, one per label

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def data_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("PEFTLAB_DATA", "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[1]
    return roots + [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def load_task(task: str, *, text_column: str | None = None, label_column: str | None = None,
              seed: int = 0) -> Task:
    """Load a built-in task by name, or a local file/directory with the given columns.

    Args:
        task: a name in `TASKS`, a data file, or a directory with train/validation/test files.
        text_column / label_column: the columns to read (default `text` / `label`).
        seed: seeds the 80/10/10 split of a single local file.

    Raises:
        PeftlabError: unknown task, missing file or column, bad labels, empty data.
    """
    spec = TASKS.get(task)
    path = Path(task)
    if spec is not None:
        folder = next((r / task for r in data_roots() if (r / task / "train.jsonl").is_file()), None)
        raw = _read_folder(folder) if folder else _read_hub(spec)
    elif path.is_dir():
        raw = _read_folder(path)
    elif path.is_file() or path.suffix in FORMATS:
        raw = _split_one(_read_file(path), seed)
    else:
        from peftlab.generation import GEN_TASKS  # here: generation imports this module

        raise unknown("task", task, [*TASKS, *GEN_TASKS], "or give a .jsonl/.csv/.tsv/.parquet file or a folder")
    text_column = text_column or (spec.text_column if spec else "text")
    label_column = label_column or (spec.label_column if spec else "label")
    if text_column == label_column:
        raise PeftlabError(f"--text-column and --label-column are both '{text_column}'; name two columns")
    texts = {s: _texts(raw[s], s, text_column, label_column) for s in SPLITS}
    if spec:
        labels = spec.labels
        ids = {s: _builtin_labels(raw[s][label_column], s, spec) for s in SPLITS}
    else:
        values = {s: _label_values(raw[s][label_column], s) for s in SPLITS}
        labels = _label_names(values)
        ids = {s: _label_ids(values[s], s, labels) for s in SPLITS}
    splits = {s: Dataset.from_dict({"text": texts[s], "label": ids[s]}) for s in SPLITS}
    name = spec.name if spec else path.stem
    return Task(name=name, labels=labels, metric=spec.metric if spec else "accuracy", splits=splits,
                template=spec.template if spec else "{text}", words=(spec and spec.words) or labels)


# -- reading files ---------------------------------------------------------------------------
# Files are parsed here, not by `datasets.load_dataset`: its errors say "An error occurred while
# generating the dataset" without the line, it logs to stderr, and it caches every file it reads.

ID_COLUMNS = ("id", "idx")  # a column of row ids: duplicates mean a row was copied by mistake


def _read_file(path: Path) -> Dataset:
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise PeftlabError(f"'{path}' has the unsupported format '{path.suffix}'; save it as "
                           f"{', '.join(FORMATS)}")
    if not path.is_file():
        raise PeftlabError(f"data file '{path}' does not exist; check the path (or give a built-in task, "
                           f"e.g. {', '.join(TASKS)})")
    if kind == "parquet":
        ds = _read_parquet(path)
    else:
        text = _utf8(path)
        if not text.strip():
            raise PeftlabError(f"'{path}' is empty; give a file with at least one row")
        ds = _from_rows(path, _json_rows(path, text)) if kind == "json" else _read_csv(path, text)
    if len(ds) == 0:
        raise PeftlabError(f"'{path}' has no rows; give a file with at least one row")
    _check_ids(ds, path)
    return ds


def _utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is harmless: drop it
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PeftlabError(f"'{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); re-encode it "
                           f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`") from None


def _kind(value) -> str:
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
                raise PeftlabError(f"'{path}': item {bad + 1} of its list is a JSON {_kind(doc[bad])}, not an object; "
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
            raise PeftlabError(f"line {n} of '{path}' is a JSON {_kind(row)}, not an object; write one object per "
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
            first.setdefault(_kind(v), i)
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


def _read_folder(folder: Path) -> dict[str, Dataset]:
    out = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
        if not found:
            raise PeftlabError(f"'{folder}' has no {split} file; add {split}.jsonl (or .csv/.tsv/.parquet) "
                               "beside the other splits")
        out[split] = _read_file(found[0])
    return out


def _read_hub(spec: TaskSpec) -> dict[str, Dataset]:
    path, config, text = spec.hub
    try:
        dd = load_dataset(path, config)
    except Exception as e:
        raise PeftlabError(
            f"task '{spec.name}' was not found under {', '.join(map(str, data_roots()))} and the hub "
            f"copy '{path}' could not be loaded ({type(e).__name__}); set PEFTLAB_DATA to a folder "
            f"holding {spec.name}/train.jsonl"
        ) from e
    dd = dd.rename_column(text, "text") if text != "text" else dd
    if "validation" not in dd or "test" not in dd or -1 in dd["test"]["label"]:
        # GLUE-style hubs hide test labels: use validation as test and carve validation from train.
        parts = dd["train"].train_test_split(test_size=0.1, seed=0)
        dd = DatasetDict(train=parts["train"], validation=parts["test"], test=dd.get("validation", dd["train"]))
    return dict(dd)


def _split_one(ds: Dataset, seed: int) -> dict[str, Dataset]:
    if len(ds) < 10:
        raise PeftlabError(f"a single data file needs at least 10 rows to split 80/10/10, it has {len(ds)}; add "
                           "rows, or give a folder with train, validation and test files")
    order = np.random.default_rng(seed).permutation(len(ds))
    a, b = int(0.8 * len(ds)), int(0.9 * len(ds))
    return {"train": ds.select(order[:a]), "validation": ds.select(order[a:b]), "test": ds.select(order[b:])}


# -- columns and labels ----------------------------------------------------------------------

def missing_column(split: str, column: str, columns: list[str], flag: str) -> PeftlabError:
    """The error for a column a split lacks: its columns, the closest name, the flag to set."""
    hint = did_you_mean(column, columns)
    hint = hint + " " if hint else ""
    if len(columns) == 1 and ("," in columns[0] or "\t" in columns[0]):
        hint = "the header looks like one field: is the file's extension (.csv or .tsv) its delimiter? "
    return PeftlabError(f"{split} data has no column '{column}' (columns: {', '.join(columns) or 'none'}); "
                        f"{hint}name the right one with {flag}")


def _texts(ds: Dataset, split: str, text_column: str, label_column: str) -> list[str]:
    """The split's texts, once both columns are known to be there."""
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in ds.column_names:
            raise missing_column(split, col, ds.column_names, flag)
    texts = ds[text_column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PeftlabError(f"{split} row {i}: text is {_value_kind(t)}, not a string; fix or drop the row")
    return texts


def _value_kind(v) -> str:
    if v is None:
        return "missing (null)"
    return "missing (an empty cell or NaN)" if _missing(v) else f"a {_kind(v)} ({_short(v)})"


def _short(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))  # CSV readers turn empty cells into NaN


def _builtin_labels(values: list, split: str, spec: TaskSpec) -> list[int]:
    """Built-in tasks store integer label ids."""
    n = len(spec.labels)
    for i, v in enumerate(values):
        if _missing(v):
            raise PeftlabError(f"{split} row {i} has no label; fill it in or drop the row")
        if not isinstance(v, int) or isinstance(v, bool):
            raise PeftlabError(f"{split} row {i}: label {_short(v)} is a {_kind(v)}; {spec.name} stores labels as "
                               f"ints 0..{n - 1} ({', '.join(spec.labels)})")
        if not 0 <= v < n:
            raise PeftlabError(f"{split} row {i}: label {v!r} is out of range; labels are ints 0..{n - 1} "
                               f"({', '.join(spec.labels)})")
    return values


def _label_values(values: list, split: str) -> list:
    """A local split's labels as strings or ints (whole floats, as CSV readers make them, become ints)."""
    out = []
    for i, v in enumerate(values):
        if _missing(v):
            raise PeftlabError(f"{split} row {i} has no label; fill it in or drop the row")
        if isinstance(v, float):
            if not v.is_integer():
                raise PeftlabError(f"{split} row {i}: label {v!r} is not a whole number; classification labels are "
                                   "names or integers (for a score, bin it into classes first)")
            v = int(v)
        if not isinstance(v, (str, int)):
            raise PeftlabError(f"{split} row {i}: label {_short(v)} is a {_kind(v)}; a label is one name or "
                               "integer per row")
        out.append(v)
    return out


def _label_names(values: dict[str, list]) -> tuple[str, ...]:
    train = set(values["train"])
    names = tuple(str(x) for x in sorted(train, key=lambda x: (str(type(x)), x)))
    if len(names) < 2:
        raise PeftlabError(f"the train data has a single label ({', '.join(names)}); a classifier needs at least "
                           "two: check --label-column, or add rows of the other labels")
    return names


def _label_ids(values: list, split: str, labels: tuple[str, ...]) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({str(v) for v in values} - set(index))
    if unseen:
        raise PeftlabError(f"{split} labels {unseen[:5]} never occur in train (train labels: "
                           f"{', '.join(labels)}); every split must share one label set: fix those rows or "
                           "add examples of them to train")
    return [index[str(v)] for v in values]


def subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A fixed, seeded subset of n rows, stratified by label when there is one (each label keeps its share)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise PeftlabError(f"a row limit must be positive, got {n}")
    rng = np.random.default_rng(seed)
    if "label" not in ds.column_names:
        return ds.select(np.sort(rng.permutation(len(ds))[:n]))
    labels = np.asarray(ds["label"])
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / len(ds) * n).astype(int)
    # hand the rounding remainder to the classes with the largest fractional parts
    rest = n - quota.sum()
    quota[np.argsort(-(counts / len(ds) * n - quota))[:rest]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return ds.select(np.sort(np.concatenate(picked)))


def per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """A seeded few-shot subset: k rows of each label (all of a label's rows when it has fewer)."""
    if k < 1:
        raise PeftlabError(f"--train-per-class must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return ds.select(np.sort(np.concatenate(picked)))
