"""Compare methods on one model and task: one run each, same data and seed, one table."""

import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peftlab.checkpoint import load_json, missing_folders, no_empty_folder, save_json
from peftlab.errors import Interrupted, PeftlabError
from peftlab.lab import Cell, connect, index_row, same_config, upsert
from peftlab.measure import fmt_params, fmt_seconds
from peftlab.metrics import percent
from peftlab.methods import parse_method
from peftlab.report import write_report
from peftlab.run import CONFIG, METRICS, default_run_dir, train_run
from peftlab.runconfig import RunConfig, warn_unread


def compare(cfg: RunConfig, methods: list[str], progress: bool = True) -> list[dict]:
    """Run every method with the same settings; write compare.json and compare.md under cfg.out,
    and index the runs there as an experiment's are, with its report (report.html, plots/*.png).

    Each method loads a fresh backbone (cheap once cached), so no run sees another's weights.
    Called again with the same cfg.out it continues: finished runs are kept, an interrupted one resumes.
    """
    methods = [m.strip() for m in methods]
    for m in methods:
        parse_method(m, cfg.method_args)  # every spec is checked before the first run starts
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise PeftlabError(f"--methods names {', '.join(map(repr, twice))} twice; give each method once "
                           "(for repeats, use an experiment file with seeds)")
    warn_unread(cfg, methods)
    out = Path(cfg.out) if cfg.out else default_run_dir(dataclasses.replace(cfg, method="compare"))
    dirs = [out / m.replace("+", "_") for m in methods]
    cells = [Cell({"method": m}, dataclasses.replace(cfg, method=m, out=str(d)), d) for m, d in zip(methods, dirs)]
    other = [c.id for c in cells if (c.run_dir / CONFIG).is_file() and not same_config(c)]
    if other:  # run again with the same --out, a compare continues; with other settings it would mix two
        raise PeftlabError(f"'{out}' holds a compare run with other settings ({', '.join(other)}: see their "
                           "config.json); give a new --out, or the same settings to continue it")
    records = []  # every folder there now holds these settings: finished runs are kept, the others resume
    with no_empty_folder(missing_folders(out)):
        try:
            for cell in cells:
                done = (cell.run_dir / METRICS).is_file()
                if progress:
                    Console(stderr=True).rule(f"[bold]{cell.config.method}" + (" (finished before: kept)" if done else ""))
                records.append(load_json(cell.run_dir / METRICS) if done else
                               train_run(cell.config, progress=progress, resume=(cell.run_dir / CONFIG).is_file(),
                                         check_settings=False))
        except KeyboardInterrupt:
            raise Interrupted(f"the runs so far are in '{out}'; the same compare with --out {out} continues: "
                              "finished methods are kept, the interrupted one resumes from its checkpoint") from None
    save_json(out / "compare.json", records)
    (out / "compare.md").write_text(markdown_table(records))
    db = connect(out)  # `peftlab runs` and `peftlab report` read it as an experiment's
    ids = [c.id for c in cells]  # methods of an earlier call that this one left out are not its results
    db.execute(f"DELETE FROM runs WHERE id NOT IN ({', '.join('?' * len(ids))})", ids)
    for cell, record in zip(cells, records):
        upsert(db, index_row(cell, record))  # commits, the delete with it
    db.close()
    write_report(out)
    return records


GEN_SHOWN = ("rougeL", "rouge1", "rouge2", "exact_match", "token_f1", "gen_words")


def _quality(r: dict) -> tuple[list[str], list[str]]:
    """Quality column names and values (in %) of one record: classification or generation."""
    if r.get("kind") == "generation":
        names = [r["metric"], *(m for m in GEN_SHOWN if m != r["metric"])]
    elif r.get("kind") == "multitask":  # each task's own metric, then their mean
        names = [f"{task}/{m}" for task, m in r["tasks"].items()] + ["combined"]
    else:
        names = ["accuracy"] + ([] if r["metric"] == "accuracy" else [r["metric"]])
    return names, [f"{percent(m, r['test'][m]):.1f}" for m in names]


def columns(records: list[dict]) -> list[str]:
    return ["method", *_quality(records[0])[0], "trainable", "%", "s/epoch", "tok/s", "peak MiB"]


def rows(records: list[dict]) -> list[list[str]]:
    out = []
    for r in records:
        out.append([
            r["method"], *_quality(r)[1], fmt_params(r["trainable_params"]),
            f"{r['trainable_pct']:.2f}", fmt_seconds(sum(r['time_per_epoch_s']) / len(r['time_per_epoch_s'])),
            f"{r['tokens_per_s']:.0f}", f"{r['peak_memory_mb']:.0f}",
        ])
    return out


def notes(records: list[dict]) -> list[str]:
    """What the columns leave out: the one-off pass that cached the frozen part's hidden states."""
    return [f"{r['method']}: the frozen layers ran once before training, caching their hidden states "
            f"({r['cached_features']['seconds']:.1f} s); s/epoch and tok/s are epochs read from that cache"
            for r in records if r.get("cached_features")]


def print_table(records: list[dict], console: Console | None = None) -> None:
    r0 = records[0]
    words = ", gen_words in words" if any(r.get("kind") == "generation" for r in records) else ""
    table = Table(title=f"{r0['model']} on {r0['task']}: test metrics in %{words} ({r0['test_rows']} test rows, "
                        f"{r0['train_rows']} training rows)", caption="\n".join(notes(records)) or None,
                  caption_justify="left")
    for c in columns(records):
        table.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
    for row in rows(records):
        table.add_row(*row)
    (console or Console(width=None if sys.stdout.isatty() else 120)).print(table)


def markdown_table(records: list[dict]) -> str:
    cols = columns(records)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(records)]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes(records)]) + "\n"
