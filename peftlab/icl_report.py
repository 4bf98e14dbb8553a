"""The in-context learning report, made from its records alone: the per-k table (Markdown and
the terminal) and the k-shot curve."""

import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from peftlab.metrics import percent


def table_title(records: list[dict]) -> str:
    r = records[0]
    return (f"In-context learning, {r['model']} on {r['task']}: test metrics in %{'' if r['percent'] else ' (MCC x100)'}, "
            f"mean ± std over support draws, {r['rows']} test rows; task metric: {r['metric']}")


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = list(records[0]["metrics"])
    cols = ["k", "draws", *names, "tokens/prompt", "seconds"]
    rows = [[str(r["k"]), str(len(r["values"])),
             *[f"{percent(m, r['metrics'][m]['mean']):.1f}" + (f" ± {percent(m, r['metrics'][m]['std']):.1f}"
                                                             if len(r["values"]) > 1 else "") for m in names],
             f"{r['prompt_tokens']:.0f}", f"{r['seconds']:.1f}"] for r in records]
    return cols, rows


def markdown_table(records: list[dict]) -> str:
    cols, rows = table_rows(records)
    lines = [f"**{table_title(records)}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_table(records: list[dict], path: str | Path) -> Path:
    """Write the per-k table as Markdown."""
    path = Path(path)
    path.write_text(markdown_table(records))
    return path


def print_table(records: list[dict]) -> None:
    cols, rows = table_rows(records)
    table = Table(title=table_title(records))
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def plot_curve(records: list[dict], path: str | Path) -> Path:
    """The k-shot curve as a PNG: the task metric (and accuracy, if it differs) against k, error bars = std.

    k sits on a categorical axis, so k = 0 shows and 1, 4, 16 are evenly spaced.
    """
    # Figure + the Agg canvas, not pyplot: no global backend switch, nothing left open
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r0 = records[0]
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(records))
    for m in dict.fromkeys([r0["metric"], "accuracy" if "accuracy" in r0["metrics"] else r0["metric"]]):
        mean = [percent(m, r["metrics"][m]["mean"]) for r in records]
        std = [percent(m, r["metrics"][m]["std"]) for r in records]
        label = m + (" (task metric)" if m == r0["metric"] else "")
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label=label)
    ax.set_xticks(x, [str(r["k"]) for r in records])
    ax.set_xlabel("k (support examples in the prompt)")
    ax.set_ylabel("test score (%)")
    draws = max(len(r["values"]) for r in records)
    spread = f"mean ± std over {draws} support draws per k (k = 0: one)" if draws > 1 else "one support draw per k"
    ax.set_title(f"{r0['model']} on {r0['task']}: in-context learning\n{r0['rows']} test rows, {spread}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
