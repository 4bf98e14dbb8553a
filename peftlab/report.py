"""The report of an experiment: one table, a cost table and plots, as Markdown and as a
self-contained HTML page (plots inlined), read from the experiment's SQLite index.

    peftlab report runs/spam-methods      -> report.html, report.md, plots/*.png in that folder

Runs that differ only in their seed are one row: the metric is shown as mean ± std over seeds.
"""

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from peftlab.checkpoint import atomic_write_text
from peftlab.errors import PeftlabError
from peftlab.lab import query
from peftlab.measure import describe_machine, fmt_params, fmt_seconds
from peftlab.metrics import percent

PLOTS = "plots"


def _figure(w: float = 6.4, h: float = 4.0):
    # Figure + the Agg canvas, not pyplot: no global backend switch, nothing left open
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _label(params: dict, skip: tuple[str, ...] = ("seed",)) -> str:
    return ", ".join(f"{k}={v}" if k != "method" else str(v) for k, v in params.items() if k not in skip) or "run"


def group(rows: list[dict]) -> list[dict]:
    """Finished runs grouped by their settings except the seed: mean and std of each figure."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        r = {**r, "record": json.loads(r["record"])}  # parsed once
        params = json.loads(r["params"])
        key = json.dumps({"model": r["model"], "task": r["task"], **{k: v for k, v in params.items() if k != "seed"}})
        groups[key].append(r)
    out = []
    mean = lambda rs, k: float(np.mean([np.nan if r[k] is None else r[k] for r in rs]))  # None: nothing trained
    for key, rs in groups.items():
        values = np.array([percent(r["metric"], r["value"]) for r in rs])
        out.append({
            "settings": json.loads(key), "label": _label(json.loads(rs[0]["params"])), "runs": [r["id"] for r in rs],
            "metric": rs[0]["metric"], "mean": float(values.mean()), "n": len(rs),
            "std": float(values.std(ddof=1)) if len(rs) > 1 else 0.0,  # over seeds: the sample std, as ICL's
            "trainable_params": rs[0]["trainable_params"], "trainable_pct": rs[0]["trainable_pct"],
            "peak_memory_mb": mean(rs, "peak_memory_mb"), "s_per_epoch": mean(rs, "s_per_epoch"),
            "tokens_per_s": mean(rs, "tokens_per_s"),
            "adapter_bytes": rs[0]["adapter_bytes"],
            "eval_s": float(np.mean([r["record"].get("test_time_s", np.nan) for r in rs])),
            "records": [r["record"] for r in rs],
        })
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def results_table(groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = ["settings", "task", "metric", "mean ± std", "seeds", "trainable", "%", "peak MiB", "s/epoch", "tok/s",
            "adapter"]
    rows = [[g["label"], g["settings"]["task"], g["metric"],
             f"{g['mean']:.1f} ± {g['std']:.1f}" if g["n"] > 1 else f"{g['mean']:.1f}", str(g["n"]),
             fmt_params(g["trainable_params"]), f"{g['trainable_pct']:.2f}", f"{g['peak_memory_mb']:.0f}",
             fmt_seconds(g['s_per_epoch']), f"{g['tokens_per_s']:.0f}" if np.isfinite(g["tokens_per_s"]) else "-",
             _size(g["adapter_bytes"])] for g in groups]
    return cols, rows


def cost_table(groups: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Training (s/epoch) and inference (test-set evaluation time) relative to full fine-tuning
    of the same model on the same task, when the experiment has such a run to compare with. Runs with
    cached features train and evaluate from the cache: their costs are what the user pays here,
    not what serving the model from raw text would cost."""
    cols = ["settings", "task", "training s/epoch vs full", "test-set time vs full", "peak memory vs full"]
    rows = []
    for g in groups:
        full = next((f for f in groups if f["settings"].get("method") == "full"
                     and all(f["settings"][k] == g["settings"][k] for k in ("model", "task"))), None)
        if full is None:
            continue
        ratio = lambda k: f"{g[k] / full[k]:.2f}x" if np.isfinite(g[k] / full[k]) else "-"  # nan: not measured
        rows.append([g["label"], g["settings"]["task"], ratio("s_per_epoch"), ratio("eval_s"), ratio("peak_memory_mb")])
    return (cols, rows) if rows else None


# -- plots -----------------------------------------------------------------------------------

def smooth(xs: list[float], window: int) -> np.ndarray:
    """Moving average over `window` steps (shorter at the start): step losses are noisy."""
    c = np.cumsum(np.insert(np.asarray(xs, dtype=float), 0, 0.0))
    i = np.arange(1, len(xs) + 1)
    return (c[i] - c[np.maximum(0, i - window)]) / np.minimum(i, window)


def plot_losses(groups: list[dict], path: Path) -> Path:
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for g in groups:
        h = g["records"][0]["history"]
        if not h:  # in-context cells train nothing
            continue
        steps = [x for e in h for x in e.get("losses", [])]  # every optimizer step's loss
        if steps:
            line, = axes[0].plot(np.arange(1, len(steps) + 1), smooth(steps, max(1, len(steps) // 10)),
                                 label=g["label"])
        else:  # records written before step losses were kept: one point an epoch
            line, = axes[0].plot([e["epoch"] for e in h], [e["train_loss"] for e in h], marker="o", label=g["label"])
        axes[1].plot([e["epoch"] for e in h], [e["val_loss"] for e in h], marker="o", color=line.get_color())
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("training loss (moving average over 10% of the steps)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation loss")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("training and validation loss (first seed of each setting)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_metric(groups: list[dict], path: Path) -> Path:
    fig = _figure(max(6.4, 0.7 * len(groups) + 2), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    ax.bar(x, [g["mean"] for g in groups], yerr=[g["std"] for g in groups], capsize=4, color="#4C78A8")
    ax.set_xticks(x, [g["label"] for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test {groups[0]['metric']} (%)")
    ax.set_title("test metric by setting (mean ± std over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both: fewer parameters and a higher metric."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(groups: list[dict], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(max(1, g["trainable_params"]), g["mean"]) for g in groups]
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[g["std"] for g in groups], fmt="o", capsize=3)
    for g, (x, y) in zip(groups, pts):
        ax.annotate(g["label"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = [pts[i] for i in pareto(pts)]
    if len(front) > 1:  # one point is no front
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#E45756", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"test {groups[0]['metric']} (%)")
    ax.set_title("quality against trainable parameters", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def sweeps(groups: list[dict]) -> dict[str, list[dict]]:
    """Settings swept over two or more numeric values (lr, lora_r, virtual_tokens, temperature, ...)."""
    found: dict[str, list[dict]] = {}
    keys = {k for g in groups for k in g["settings"]} - {"model", "task", "method"}
    for k in sorted(keys):
        values = {g["settings"][k] for g in groups
                  if isinstance(g["settings"].get(k), (int, float)) and not isinstance(g["settings"][k], bool)}
        if len(values) >= 2:
            found[k] = [g for g in groups if k in g["settings"]]
    return found


def plot_sweep(key: str, groups: list[dict], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    lines: dict[str, list[dict]] = defaultdict(list)
    for g in groups:
        lines[_label({k: v for k, v in g["settings"].items() if k not in ("model", key)})].append(g)
    for name, gs in lines.items():
        gs = sorted(gs, key=lambda g: g["settings"][key])
        ax.errorbar([g["settings"][key] for g in gs], [g["mean"] for g in gs], yerr=[g["std"] for g in gs],
                    marker="o", capsize=3, label=name)
    values = sorted({g["settings"][key] for g in groups})
    if values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"test {groups[0]['metric']} (%)")
    ax.set_title(f"sweep of {key}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


# -- the documents ---------------------------------------------------------------------------

def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                     ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _html_table(cols: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


COST_NOTE = ("Runs with a frozen bottom (head, last-N) train and evaluate from cached features, so their time "
             "is what this experiment paid, not what serving the model from raw text costs.")

NO_FULL = ("No full fine-tuning run of the same model and task here to compare with: add method full to "
           "see each method's training time, test-set time and memory relative to it.")

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em}.small{color:#666;font-size:13px}"""


def write_report(exp_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md, report.html and plots/*.png into the experiment folder; returns the two documents."""
    exp_dir = Path(exp_dir)
    rows = query(exp_dir)
    done, failed = [r for r in rows if r["status"] == "done"], [r for r in rows if r["status"] != "done"]
    if not done:
        raise PeftlabError(f"'{exp_dir}' has no finished run to report; run the experiment first")
    groups = group(done)
    (exp_dir / PLOTS).mkdir(exist_ok=True)
    plots = {"metric by setting": plot_metric(groups, exp_dir / PLOTS / "metric.png"),
             "metric vs trainable parameters": plot_pareto(groups, exp_dir / PLOTS / "pareto.png"),
             "loss curves": plot_losses(groups, exp_dir / PLOTS / "losses.png")}
    for key, gs in sweeps(groups).items():
        plots[f"sweep: {key}"] = plot_sweep(key, gs, exp_dir / PLOTS / f"sweep_{key}.png")
    cols, table = results_table(groups)
    cost = cost_table(groups)
    machine = describe_machine(json.loads(done[0]["record"]).get("machine", {}))
    title = f"peftlab report: {exp_dir.name}"
    runs = [[r["id"], r["status"], r["method"], r["task"], str(r["seed"]),
             f"{percent(r['metric'], r['value']):.1f}" if r["status"] == "done" else (r["error"] or "")[:80]] for r in rows]
    run_cols = ["run", "status", "method", "task", "seed", "test metric (%) / error"]

    md = [f"# {title}\n", f"{len(done)} finished runs, {len(failed)} failed; machine: {machine}\n",
          "## Results\n", _md_table(cols, table)]
    if cost:
        md += ["## Cost relative to full fine-tuning (measured)\n", COST_NOTE + "\n", _md_table(*cost)]
    else:
        md += ["## Cost relative to full fine-tuning\n", NO_FULL + "\n"]
    md += [f"## {name}\n\n![{name}]({PLOTS}/{p.name})\n" for name, p in plots.items()]
    md += ["## Runs\n", _md_table(run_cols, runs)]
    md_path = exp_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md))

    img = lambda p: f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class=small>{len(done)} finished runs, {len(failed)} failed; machine: {html.escape(machine)}</p>",
            "<h2>Results</h2>", _html_table(cols, table)]
    if cost:
        body += ["<h2>Cost relative to full fine-tuning (measured)</h2>", f"<p class=small>{COST_NOTE}</p>",
                 _html_table(*cost)]
    else:
        body += ["<h2>Cost relative to full fine-tuning</h2>", f"<p class=small>{NO_FULL}</p>"]
    body += [f"<h2>{html.escape(name)}</h2>{img(p)}" for name, p in plots.items()]
    body += ["<h2>Runs</h2>", _html_table(run_cols, runs)]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    html_path = exp_dir / "report.html"
    atomic_write_text(html_path, page)
    return md_path, html_path
