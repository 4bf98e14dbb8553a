"""Experiments: a YAML file of defaults and a grid, one run per grid cell, an SQLite index.

    name: spam-methods
    defaults: {model: smollm2-135m, task: sms_spam, train_limit: 300, epochs: 2}
    grid:
      method: [head, last-block+norm, lora]
      seed: [0, 1]

Keys are the flags of `peftlab train` with underscores (RunConfig, TrainArgs, MethodArgs and
Sampling fields alike). Each cell's resolved config names its run folder (a hash of it), so
re-running an experiment skips every finished cell and resumes interrupted ones from their
checkpoints. Every finished run's record (metrics.json) is also a row of `index.sqlite` in the
experiment folder, which is what queries and reports read.
"""

import dataclasses
import hashlib
import itertools
import json
import sqlite3
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from peftlab.checkpoint import load_json, load_yaml, save_json
from peftlab.config import build
from peftlab.decode import Sampling
from peftlab.errors import Interrupted, PeftlabError, did_you_mean
from peftlab.measure import PeakMemory, fmt_params, fmt_seconds, machine, versions
from peftlab.metrics import percent
from peftlab.methods import MethodArgs, parse_method, unread_args
from peftlab.run import CONFIG, METRICS, train_run
from peftlab.runconfig import RunConfig
from peftlab.train import TrainArgs

INDEX = "index.sqlite"
NESTED = {"train": TrainArgs, "method_args": MethodArgs, "decoding": Sampling}


def _owners() -> dict[str, str | None]:
    """Flat key -> the RunConfig field holding it (None: RunConfig itself)."""
    owners: dict[str, str | None] = {f.name: None for f in dataclasses.fields(RunConfig) if f.name not in NESTED}
    for attr, cls in NESTED.items():
        owners.update({f.name: attr for f in dataclasses.fields(cls)})
    owners.pop("out")
    return owners


def resolve(flat: dict) -> RunConfig:
    """A RunConfig from flat keys (as in an experiment file); unknown keys are refused by name."""
    owners = _owners()
    unknown = sorted(set(flat) - set(owners))
    if unknown:
        raise PeftlabError(f"unknown setting(s) {unknown}; valid: the flags of `peftlab train` with underscores, "
                           f"e.g. {', '.join(sorted(owners)[:6])}...")
    top = {k: v for k, v in flat.items() if owners[k] is None}
    nested = {attr: {k: v for k, v in flat.items() if owners[k] == attr} for attr in NESTED}
    return build(RunConfig, {**top, **nested}, "experiment cell", unknown="error")


ICL = "icl"  # an experiment's method name for in-context cells: k-shot prompts, nothing trained


@dataclass
class Cell:
    """One grid cell: the values it varies, its resolved config, its run folder."""

    params: dict
    config: RunConfig
    run_dir: Path
    shots: int = 0  # in-context cells (method icl): support examples per prompt

    @property
    def id(self) -> str:
        return self.run_dir.name

    @property
    def in_context(self) -> bool:
        return self.config.method == ICL


@dataclass
class Experiment:
    name: str
    defaults: dict
    grids: list[dict[str, list]]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Experiment":
        path = Path(path)
        doc = load_yaml(path, "experiment file")
        keys = ["name", "defaults", "grid", "description"]
        if not isinstance(doc, dict):
            raise PeftlabError(f"experiment file '{path}' needs a mapping with 'defaults' and 'grid' "
                               "(and optionally 'name', 'description')")
        extra = sorted(str(k) for k in set(doc) - set(keys))
        if extra:
            hint = did_you_mean(extra[0], keys)
            raise PeftlabError(f"experiment file '{path}' has unknown key(s) {extra}; {hint + ' ' if hint else ''}"
                               f"valid: {', '.join(keys)}")
        if not isinstance(doc.get("defaults") or {}, dict):
            raise PeftlabError(f"experiment file '{path}': 'defaults' needs a mapping of settings, e.g. {{epochs: 2}}")
        listed = [k for k, v in (doc.get("defaults") or {}).items() if isinstance(v, list)]
        if listed:
            raise PeftlabError(f"experiment file '{path}': '{listed[0]}' in defaults is a list; defaults hold one "
                               f"value each, lists of values to sweep go under grid: (e.g. grid: {{{listed[0]}: [...]}})")
        grids = doc.get("grid") or {}
        grids = grids if isinstance(grids, list) else [grids]
        for grid in grids:
            if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
                raise PeftlabError(f"experiment file '{path}': 'grid' maps each setting to a non-empty list, "
                                   "e.g. {method: [head, lora], seed: [0, 1]} (or is a list of such grids)")
        return cls(doc.get("name") or path.stem, doc.get("defaults") or {}, grids, path)

    def cells(self, out: Path) -> list[Cell]:
        """Every combination of each grid's lists over the defaults, each checked before any runs.
        Several grids (a list) give the union of their cells: sweeps that do not multiply."""
        cells, seen = [], set()
        for params in (dict(zip(g, values)) for g in self.grids for values in itertools.product(*g.values())):
            flat = {**self.defaults, **params}
            shots = flat.pop("shots", 0)
            cfg = resolve(flat)
            if "shots" in params and cfg.method != ICL:
                raise PeftlabError(f"experiment '{self.name}': 'shots' applies to method icl only, but a grid gives it "
                                   f"to method '{cfg.method}' (each would train the same run); give shots in a grid "
                                   "of its own with method: [icl]")
            if cfg.method != ICL:  # in-context cells train nothing: no method to check
                parse_method(cfg.method, cfg.method_args)
            digest = hashlib.blake2b(json.dumps([dataclasses.asdict(cfg), shots], sort_keys=True,
                                                default=str).encode(), digest_size=5).hexdigest()
            if digest in seen:  # the same run named by two grids
                continue
            seen.add(digest)
            slug = "-".join(str(v) for v in params.values()).replace("/", "_").replace("+", "_").replace(",", "_")
            cfg.out = str(out / "runs" / f"{slug[:60]}-{digest}")
            cells.append(Cell(params, cfg, Path(cfg.out), shots))
        self._warn_unread(cells)
        return cells

    def _warn_unread(self, cells: list[Cell]) -> None:
        """Method settings some cells ignore, said once per experiment: swept over a method that
        does not read them (those cells repeat one run), or set in defaults for no method at all."""
        ignored: dict[str, set[str]] = {}
        trained = [c for c in cells if not c.in_context]
        for c in trained:
            for name in unread_args(parse_method(c.config.method, c.config.method_args), c.config.method_args):
                ignored.setdefault(name, set()).add(c.config.method)
        for name, methods in ignored.items():
            if any(len(g.get(name, [])) > 1 for g in self.grids):
                warnings.warn(f"experiment '{self.name}': '{name}' is swept over method(s) {', '.join(sorted(methods))}, "
                              "which do not use it: those cells repeat one run")
            elif name in self.defaults and len(methods) == len({c.config.method for c in trained}):
                warnings.warn(f"experiment '{self.name}': '{name}' in defaults is used by none of its methods")


def _json_value(text: str) -> int | float | str:
    """A --where value as the grid wrote it: SQLite compares json_extract's numbers to numbers only."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def same_config(cell: Cell) -> bool:
    """The cell's folder was started with this very config."""
    if not (cell.run_dir / CONFIG).is_file():
        return False
    plain = lambda cfg: json.loads(json.dumps(dataclasses.asdict(cfg.portable()), default=str))
    try:  # both sides with absolute local paths: folders saved before configs held them still match
        saved = plain(RunConfig.from_dict(load_json(cell.run_dir / CONFIG), str(cell.run_dir / CONFIG)))
    except PeftlabError:
        return False
    now = plain(cell.config)
    # not the folder's spelling: runs/x and /abs/runs/x, or an experiment moved, hold the same cells
    return {**saved, "out": None} == {**now, "out": None}


def finished(cell: Cell) -> bool:
    """A cell is done when its folder holds a record made from this very config."""
    return (cell.run_dir / METRICS).is_file() and same_config(cell)


# -- the index -------------------------------------------------------------------------------

COLUMNS = {"id": "TEXT PRIMARY KEY", "status": "TEXT", "model": "TEXT", "task": "TEXT", "method": "TEXT",
           "seed": "INTEGER", "metric": "TEXT", "value": "REAL", "trainable_params": "INTEGER",
           "trainable_pct": "REAL", "peak_memory_mb": "REAL", "s_per_epoch": "REAL", "tokens_per_s": "REAL",
           "adapter_bytes": "INTEGER", "wall_time_s": "REAL", "params": "TEXT", "record": "TEXT",
           "run_dir": "TEXT", "error": "TEXT"}


def connect(exp_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(exp_dir / INDEX)
    try:
        db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{k} {t}' for k, t in COLUMNS.items())})")
    except sqlite3.DatabaseError as e:
        raise PeftlabError(f"'{exp_dir / INDEX}' is not a readable index ({e}); delete it and re-run the experiment "
                           f"(peftlab run FILE --out {exp_dir}): finished cells are kept and re-indexed") from None
    return db


def index_row(cell: Cell, record: dict | None, error: str | None = None) -> dict:
    row = {"id": cell.id, "status": "failed" if error else "done", "model": cell.config.model,
           "task": cell.config.task, "method": cell.config.method, "seed": cell.config.seed,
           "params": json.dumps(cell.params, default=str), "run_dir": str(cell.run_dir), "error": error}
    if record:
        epochs = record["time_per_epoch_s"]
        row.update(task=record["task"], metric=record["metric"], value=record["test"][record["metric"]],
                   trainable_params=record["trainable_params"], trainable_pct=record["trainable_pct"],
                   peak_memory_mb=record["peak_memory_mb"],
                   s_per_epoch=sum(epochs) / len(epochs) if epochs else None,  # in-context cells train nothing
                   tokens_per_s=record["tokens_per_s"] if epochs else None, adapter_bytes=record.get("adapter_bytes"),
                   wall_time_s=record["wall_time_s"], record=json.dumps(record, default=str))
    return row


def upsert(db: sqlite3.Connection, row: dict) -> None:
    keys = list(row)
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
               [row[k] for k in keys])
    db.commit()


def query(exp_dir: str | Path, where: list[str] = (), sort: str | None = None) -> list[dict]:
    """Rows of the index; `where` holds 'key=value' (a column or a grid setting), `sort` a column
    (descending for the metric's value, '-' in front to flip)."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / INDEX).is_file():
        raise PeftlabError(f"'{exp_dir}' holds no {INDEX}; run an experiment there first (peftlab run FILE --out DIR)")
    db = connect(exp_dir)
    db.row_factory = sqlite3.Row
    clauses, args = [], []
    for w in where:
        key, sep, value = w.partition("=")
        if not sep:
            raise PeftlabError(f"--where '{w}' is not key=value, e.g. method=lora")
        col = key if key in COLUMNS else None
        if col is None and not key.replace("_", "").isalnum():
            raise PeftlabError(f"--where key '{key}' is not a column or a setting name")
        if value.startswith("="):
            raise PeftlabError(f"--where '{w}': write one '=' (e.g. {key}={value.lstrip('=')})")
        if col is None and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() and not db.execute(
                f"SELECT 1 FROM runs WHERE json_extract(params, '$.{key}') IS NOT NULL LIMIT 1").fetchone():
            raise PeftlabError(f"--where '{key}': no run here sets '{key}' (the columns: "
                               f"{', '.join(c for c in COLUMNS if c != 'record')}, or a setting a grid varies)")
        clauses.append(f"{col} = ?" if col else f"json_extract(params, '$.{key}') = ?")
        args.append(value if col else _json_value(value))
    sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
    if sort:
        col = sort.lstrip("-").replace("metric", "value")
        if col not in COLUMNS:
            raise PeftlabError(f"--sort '{sort}' is not a column; valid: {', '.join(c for c in COLUMNS if c != 'record')}")
        sql += f" ORDER BY {col} {'ASC' if sort.startswith('-') == (col == 'value') else 'DESC'}"
    return [dict(r) for r in db.execute(sql, args).fetchall()]


# -- running ---------------------------------------------------------------------------------

def icl_cell(cell: Cell) -> dict:
    """An in-context cell (method: icl, shots: k): one support draw, no training; a run record
    in the same form as a trained run's, so tables and plots take it beside them."""
    from peftlab.icl import run_icl

    cfg, t0 = cell.config, time.perf_counter()
    with PeakMemory() as mem:
        r = run_icl(cfg.model, cfg.task, [cell.shots], repeats=1, limit=cfg.eval_limit, seed=cfg.seed,
                    out_dir=cell.run_dir, batch_size=cfg.train.eval_batch_size, progress=False, show=False,
                    precision=cfg.train.precision)[0]
    record = {
        "model": cfg.model, "task": r["task"], "method": ICL, "metric": r["metric"], "shots": cell.shots,
        "kind": "generation" if r["percent"] else "classification",
        "test": {m: v["mean"] for m, v in r["metrics"].items()}, "validation": {}, "history": [],
        "trainable_params": 0, "trainable_pct": 0.0, "train_rows": 0, "test_rows": r["rows"],
        "time_per_epoch_s": [], "test_time_s": r["seconds"], "tokens_per_s": 0.0, "adapter_bytes": 0,
        "peak_memory_mb": mem.peak_mb, "wall_time_s": time.perf_counter() - t0, "run_dir": str(cell.run_dir),
        "versions": versions(), "machine": machine(),
    }
    save_json(cell.run_dir / CONFIG, dataclasses.asdict(cfg.portable()))
    save_json(cell.run_dir / METRICS, record)
    return record


def progress_table(cells: list[Cell], status: dict[str, str], started: float, durations: list[float]) -> Table:
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "skipped", "running", "failed", "waiting")}
    left = counts["waiting"] + counts["running"]
    eta = f"ETA {left * sum(durations) / len(durations) / 60:.0f} min" if durations and left else ""
    t = Table(title=f"{counts['done'] + counts['skipped']}/{len(cells)} done, {counts['running']} running, "
                    f"{counts['failed']} failed, {counts['waiting']} waiting  {eta}  "
                    f"({(time.perf_counter() - started) / 60:.1f} min)")
    keys = list(dict.fromkeys(k for c in cells for k in c.params))
    for k in [*keys, "status"]:
        t.add_column(k)
    for c in cells:
        t.add_row(*(str(c.params.get(k, "")) for k in keys), status[c.id])
    return t


def experiment_dir(exp: "Experiment", out: str | Path | None = None) -> Path:
    return Path(out or Path("runs") / exp.name)


def run_experiment(path: str | Path, out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Run every unfinished cell of an experiment file; index every finished one. Returns the index rows."""
    exp = Experiment.load(path)
    out = experiment_dir(exp, out)
    cells = exp.cells(out)  # every cell is checked before the first one runs
    out.mkdir(parents=True, exist_ok=True)
    db = connect(out)
    status = {c.id: "skipped" if finished(c) else "waiting" for c in cells}
    for c in cells:
        if status[c.id] == "skipped":
            upsert(db, index_row(c, load_json(c.run_dir / METRICS)))
    started, durations = time.perf_counter(), []
    live = Live(console=Console(stderr=True), refresh_per_second=1) if progress else None
    show = (lambda: live.update(progress_table(cells, status, started, durations))) if live else (lambda: None)
    if live:
        live.start()
    try:
        for c in cells:
            if status[c.id] != "waiting":
                continue
            status[c.id] = "running"
            show()
            t0 = time.perf_counter()
            try:
                if (c.run_dir / METRICS).exists():  # finished under another config: start over
                    (c.run_dir / METRICS).unlink()
                # an interrupted cell continues from its checkpoint
                record = icl_cell(c) if c.in_context else \
                    train_run(c.config, progress=False, resume=same_config(c), check_settings=False)
                upsert(db, index_row(c, record))
                status[c.id] = "done"
            except PeftlabError as e:
                upsert(db, index_row(c, None, str(e)))
                status[c.id] = "failed"
            except Exception as e:  # one broken cell must not stop the grid; its error is kept
                upsert(db, index_row(c, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
                status[c.id] = "failed"
            durations.append(time.perf_counter() - t0)
            show()
    except KeyboardInterrupt:
        again = f"peftlab run {path}" + (f" --out {out}" if out != experiment_dir(exp) else "")
        raise Interrupted(f"finished cells are kept in '{out}'; `{again}` continues: the interrupted cell "
                          "resumes from its checkpoint") from None
    finally:
        if live:
            live.stop()
            if not live.console.is_terminal:  # rich leaves the last line open there
                live.console.line()
    return query(out)


def print_runs(rows: list[dict], console: Console | None = None) -> None:
    t = Table(title=f"{len(rows)} runs")
    for c in ("id", "status", "model", "task", "method", "seed", "metric", "value %", "trainable", "s/epoch", "peak MiB"):
        t.add_column(c, justify="left" if c in ("id", "status", "model", "task", "method", "metric") else "right")
    for r in rows:
        done = r["status"] == "done"
        t.add_row(r["id"], r["status"], r["model"], r["task"], r["method"], str(r["seed"]), r["metric"] or "",
                  f"{percent(r['metric'], r['value']):.1f}" if done else (r["error"] or "")[:40],
                  fmt_params(r["trainable_params"]) if done else "", fmt_seconds(r['s_per_epoch']) if done else "",
                  f"{r['peak_memory_mb']:.0f}" if done else "")
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(t)
