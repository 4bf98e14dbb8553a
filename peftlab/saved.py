"""Run directories read back: continue an interrupted run, rebuild a finished run's model,
evaluate it on a split (what `peftlab train --resume`, `peftlab eval`, export and merge use)."""

import dataclasses
from pathlib import Path

from peftlab.checkpoint import load_json, load_weights
from peftlab.decode import Sampling
from peftlab.errors import PeftlabError
from peftlab.models import Backbone
from peftlab.run import CHECKPOINT, CONFIG, METRICS, PREDICTIONS, WEIGHTS, Prepared, evaluate_split, prepare, save_predictions, train_run
from peftlab.runconfig import RunConfig


def resume_run(run_dir: str | Path, *, progress: bool = True, skip_nonfinite: bool = False) -> dict:
    """Continue an interrupted run from its last checkpoint, with its saved settings
    (`skip_nonfinite`: and from now on skipping batches whose loss or gradient is not finite: a
    run stopped by one would otherwise replay the same batch into the same loss)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise PeftlabError(f"'{run_dir}' is not a run directory (no {CONFIG}); give the --out of the run to continue")
    if (run_dir / METRICS).is_file():
        raise PeftlabError(f"'{run_dir}' is a finished run; nothing to resume (evaluate it with `peftlab eval`)")
    cfg = RunConfig.from_dict(load_json(run_dir / CONFIG), f"'{run_dir / CONFIG}'")
    cfg.out = str(run_dir)
    cfg.train.skip_nonfinite = cfg.train.skip_nonfinite or skip_nonfinite
    return train_run(cfg, progress=progress, resume=True, check_settings=False)  # said when it began


def is_run(path: str | Path) -> bool:
    """A peftlab run folder (its config.json names a task and a method), not a model folder."""
    f = Path(path, CONFIG)
    return f.is_file() and _is_run_config(load_json(f))


def _is_run_config(config) -> bool:
    return isinstance(config, dict) and "task" in config and "method" in config


def check_outside_runs(out: str | Path) -> None:
    """Refuse to write a model or adapter into a run directory (it would overwrite config.json)."""
    if is_run(out) or Path(out, METRICS).is_file():
        raise PeftlabError(f"'{out}' is a run directory; writing there would overwrite its files: give a new --out")


def load_run(run_dir: str | Path, backbone: Backbone | None = None) -> tuple[RunConfig, Prepared]:
    """Rebuild a finished run's model with its trained weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PeftlabError(f"run directory '{run_dir}' does not exist; check the path (peftlab train --out names it)")
    if not (run_dir / CONFIG).is_file():
        raise PeftlabError(f"'{run_dir}' is not a run directory (no {CONFIG}); give a folder written by peftlab train")
    raw = load_json(run_dir / CONFIG)  # read once: what kind of folder, then the config itself
    if not _is_run_config(raw):
        raise PeftlabError(f"'{run_dir}' is a model directory (a Hugging Face {CONFIG}), not a peftlab run; use it as "
                           f"a model: --model {run_dir} (or `peftlab generate {run_dir}`)")
    if not (run_dir / WEIGHTS).is_file():
        if raw.get("method") == "icl":  # an experiment's in-context cell: a record, no model
            raise PeftlabError(f"'{run_dir}' is an in-context cell: it trains nothing, so there is no model to load; "
                               f"its metrics are in {run_dir / METRICS}")
        raise PeftlabError(f"'{run_dir}' has no trained weights yet (an unfinished run); continue it with "
                           f"`peftlab train --resume {run_dir}`")
    cfg = RunConfig.from_dict(raw, f"'{run_dir / CONFIG}'")
    p = prepare(cfg, backbone, transfer=False)  # transferred tensors were saved with the run
    weights = load_weights(run_dir / WEIGHTS)
    missing = sorted(set(p.trainable) - set(weights))
    if missing:
        raise PeftlabError(f"'{run_dir / WEIGHTS}' lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                           "it does not belong to this run's model and method")
    p.model.load_state_dict(weights, strict=False)
    return cfg, p


def eval_run(run_dir: str | Path, split: str = "test", decoding: Sampling | dict | None = None, *,
             max_new_tokens: int | None = None, seed: int | None = None,
             predictions: str | Path | None = None) -> dict[str, float]:
    """Metrics of a saved run on one split. Generation runs may decode with other `decoding`
    settings (a Sampling, or a dict of the fields to change in the run's), `max_new_tokens` and
    sampling `seed` (default: the run's). `predictions`: a .jsonl file for each row's input,
    output and reference."""
    if split not in ("train", "validation", "test"):
        raise PeftlabError(f"--split '{split}' is unknown; valid: train, validation, test")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PeftlabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if predictions is not None:
        own = (CONFIG, METRICS, WEIGHTS, CHECKPOINT, PREDICTIONS)
        if Path(predictions).name in own and is_run(Path(predictions).parent):
            raise PeftlabError(f"--predictions '{predictions}' would overwrite that run's own file; give another "
                               "name, e.g. test-temp0.7.jsonl")
        if Path(predictions).is_dir():
            raise PeftlabError(f"--predictions '{predictions}' is a folder; give a file name such as preds.jsonl")
    cfg, p = load_run(run_dir)
    if not p.generative and (decoding not in (None, {}, Sampling()) or max_new_tokens is not None or seed is not None):
        raise PeftlabError(f"'{run_dir}' is a classification run: decoding settings (--temperature, --top-k, "
                           "--top-p, --repetition-penalty, --max-new-tokens, --seed) apply to generation runs only")
    if predictions is not None and p.multi:
        raise PeftlabError(f"'{run_dir}' is a multi-task run: its rows have no one label set to write "
                           "predictions in; evaluate without --predictions")
    if isinstance(decoding, dict):
        decoding = Sampling(**{**dataclasses.asdict(cfg.decoding), **decoding})
    cfg.decoding = decoding or cfg.decoding
    cfg.max_new_tokens = max_new_tokens or cfg.max_new_tokens
    cfg.seed = cfg.seed if seed is None else seed
    metrics, loss, outputs = evaluate_split(p, cfg, split, progress=True)
    if predictions is not None:
        save_predictions(Path(predictions), p, split, outputs)
    return {**metrics, "loss": loss, "rows": len(p.data[split])}
