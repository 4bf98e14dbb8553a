"""The `peftlab` command. Every RunConfig / TrainArgs field is a flag; errors print as one line."""

import argparse
import dataclasses
import os
import sys
import types
import typing
import warnings

from peftlab.errors import PeftlabError
from peftlab.runconfig import EMBEDDED, PRECISIONS, MethodArgs, RunConfig, Sampling, TrainArgs


def _flag_type(tp):
    """The argparse type of a dataclass field annotation (X | None -> X)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                        unset: str | None = None) -> None:
    """A flag per field. `unset`: every flag defaults to None, its help saying what that means
    (e.g. "the run's": only the flags given override a saved config)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING and unset is None else None
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        flag = {"nargs": "?", "const": True} if tp is bool else {}  # a bare --chat means --chat true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_bool if tp is bool else tp,
                            default=default, choices=choices, metavar=None if choices else tp.__name__.upper(), **flag,
                            help=f.metadata.get("help", "") + ("" if "default" in f.metadata.get("help", "")
                                                               else f" (default: {unset or default})"))


def _pick(ns: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def config_from_args(ns: argparse.Namespace, **override):
    run_kw = {k: v for k, v in _pick(ns, RunConfig).items() if k not in ("train", "method_args", "decoding")}
    return RunConfig(**{**run_kw, **override}, train=TrainArgs(**_pick(ns, TrainArgs)),
                     method_args=MethodArgs(**_pick(ns, MethodArgs)), decoding=Sampling(**_pick(ns, Sampling)))


class Parser(argparse.ArgumentParser):
    """argparse with peftlab's one-line errors (its own print the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"peftlab: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="peftlab", description="Fine-tune pretrained transformers cheaply and "
                                "compare the ways of doing it.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one method on one task and write a run directory")
    for cls in (RunConfig, TrainArgs, MethodArgs, Sampling):
        add_dataclass_flags(t, cls)
    t.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue an interrupted run from its last "
                   "checkpoint, with the settings in its config.json (give no other flags but --nproc, and "
                   "--skip-nonfinite true to go on past a non-finite loss)")
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine: runs the same "
                   "command under torchrun (default: 1); several machines: see the README")

    c = sub.add_parser("compare", help="train several methods with the same settings and print a table")
    c.add_argument("--methods", required=True, help="comma-separated method specs, e.g. head,last-1,full")
    add_dataclass_flags(c, RunConfig, skip=("method",))
    add_dataclass_flags(c, TrainArgs)
    add_dataclass_flags(c, MethodArgs)
    add_dataclass_flags(c, Sampling)

    gen = sub.add_parser("generate", help="continue prompts with a trained run or a model (streams one prompt)")
    gen.add_argument("source", help="a run directory, or a model name/path")
    gen.add_argument("--prompt", action="append", required=True, help="input text (repeat for a batch); a "
                     "generation run frames it with its task template")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's task's, or 64")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default: none for a "
                     "model, a newline for a generation run)")
    gen.add_argument("--chat", action="store_true", help="wrap a plain model's prompt in its chat template")
    gen.add_argument("--seed", type=int, default=0, help="seeds sampling (default: 0)")
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    gen.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 autocast where the CPU has "
                     "bf16 instructions (weights cast once per call), else fp32 (the reference); default: auto")
    add_dataclass_flags(gen, Sampling)

    e = sub.add_parser("eval", help="evaluate a finished run directory")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"), help="default: test")
    add_dataclass_flags(e, Sampling, unset="the run's")  # generation runs: decode otherwise than in training
    e.add_argument("--max-new-tokens", type=int, default=None, metavar="INT", help="generation runs: tokens to decode at most "
                   "(default: the run's)")
    e.add_argument("--seed", type=int, default=None, metavar="INT", help="generation runs: the sampling seed (default: the run's)")
    e.add_argument("--predictions", metavar="FILE", default=None, help="write each row's input, output and "
                   "reference to this .jsonl file (default: none)")

    x = sub.add_parser("export", help="write a run's adapter in Hugging Face PEFT layout")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors")

    g = sub.add_parser("merge", help="fold a run's LoRA/IA3/selective changes into a plain transformers model")
    g.add_argument("run_dir")
    g.add_argument("--out", required=True, help="directory for the merged model (safetensors) and its head")

    icl = sub.add_parser("icl", help="in-context learning baseline: k-shot prompts, no training; the k-shot curve")
    icl.add_argument("--model", default="smollm2-135m", help="a causal LM (default: smollm2-135m)")
    icl.add_argument("--task", default="sst2", help="a classification or generation task (default: sst2)")
    icl.add_argument("--shots", default="0,1,4,8,16", help="comma-separated k values (default: 0,1,4,8,16)")
    icl.add_argument("--repeats", type=int, default=3, help="support draws per k > 0 (default: 3)")
    icl.add_argument("--limit", type=int, default=None, help="evaluate on a seeded subset of N test rows "
                     "(default: all)")
    icl.add_argument("--seed", type=int, default=0, help="seeds the support draws and the subset (default: 0)")
    icl.add_argument("--batch-size", type=int, default=16, help="prompts scored at once (default: 16)")
    icl.add_argument("--max-length", type=int, default=1024, help="token budget of one prompt (default: 1024)")
    icl.add_argument("--out", default=None, help="folder for icl.json, icl.md, icl_curve.png (default: "
                     "runs/icl-<model>-<task>-<time>)")
    icl.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 autocast where the CPU has "
                     "bf16 instructions (label words still scored in fp32), else fp32 (the reference); default: auto")

    ex = sub.add_parser("run", help="run an experiment file (defaults + grid); re-run to continue where it stopped")
    ex.add_argument("experiment", help="a YAML file, e.g. experiments/spam_methods.yaml")
    ex.add_argument("--out", default=None, help="experiment folder (default runs/<experiment name>)")

    rp = sub.add_parser("report", help="write an experiment's report: report.html, report.md, plots/*.png")
    rp.add_argument("exp_dir", help="an experiment folder (holds index.sqlite)")

    rs = sub.add_parser("runs", help="query an experiment's index of runs")
    rs.add_argument("exp_dir", help="an experiment folder (holds index.sqlite)")
    rs.add_argument("--where", action="append", default=[], help="key=value: a column (method, task, seed, "
                    "status...) or a grid setting (lr, lora_r...); repeatable")
    rs.add_argument("--sort", default=None, help="a column, e.g. metric (best first) or -s_per_epoch")

    sub.add_parser("models", help="list the embedded model names")

    i = sub.add_parser("inspect", help="show a model's blocks and parameter counts")
    i.add_argument("model")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command in LIGHT:
        return COMMANDS[args.command](args) or 0
    _quiet_libraries()
    from peftlab import parallel
    from peftlab.speed import tune_allocator

    tune_allocator()  # before any tensor: every command allocates less often from the kernel
    try:
        if getattr(args, "nproc", 1) != 1 and not parallel.launched():
            return _launch(argv, args.nproc)
        if parallel.launched() and args.command != "train":
            raise PeftlabError(f"`peftlab {args.command}` runs in one process; under torchrun use `peftlab train`")
        return COMMANDS[args.command](args) or 0
    except PeftlabError as e:
        if parallel.is_main():  # every process meets the same bad input: one says it
            print(f"peftlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if parallel.is_main():  # one message under torchrun, not one a process
            print("peftlab: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    finally:
        if parallel.world() > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _launch(argv: list[str], nproc: int) -> int:
    from peftlab import parallel

    if nproc < 1:
        raise PeftlabError(f"--nproc must be at least 1, got {nproc}")
    i = argv.index("--nproc") if "--nproc" in argv else None
    rest = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
    return parallel.launch(rest, nproc)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.formatwarning = lambda msg, cat, *a, **k: f"peftlab: warning: {msg}\n"


def cmd_train(args) -> None:
    from peftlab import parallel
    from peftlab.comparison import print_table
    from peftlab.run import train_run
    from peftlab.saved import resume_run

    cfg = config_from_args(args)
    if args.resume:  # the saved settings, but for going on past a non-finite loss
        if dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, skip_nonfinite=False)) != RunConfig():
            raise PeftlabError(f"--resume continues '{args.resume}' with the settings in its config.json; "
                               "give no other flags but --nproc and --skip-nonfinite true")
        record = resume_run(args.resume, skip_nonfinite=cfg.train.skip_nonfinite)
    else:
        record = train_run(cfg)
    if parallel.is_main():
        print_table([record])
        print(f"run directory: {record['run_dir']}")


def cmd_compare(args) -> None:
    from peftlab.comparison import compare, print_table

    methods = [m for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise PeftlabError("--methods is empty; give comma-separated specs such as head,last-1,full")
    records = compare(config_from_args(args, method=methods[0]), methods)
    print_table(records)
    where = records[0]['run_dir'].rsplit('/', 1)[0]
    print(f"results: {where}/compare.md; report with plots: {where}/report.html")


def cmd_eval(args) -> None:
    from peftlab.saved import eval_run

    from peftlab.metrics import percent

    given = {k: v for k, v in _pick(args, Sampling).items() if v is not None}
    m = eval_run(args.run_dir, args.split, given or None, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, predictions=args.predictions)
    shown = "  ".join(f"{k} {percent(k, v):.1f}" + (" words" if k == "gen_words" else "")
                      for k, v in m.items() if k not in ("rows", "loss"))
    print(f"{args.split} ({m['rows']} rows, metrics in %): {shown}  loss {m['loss']:.4f}")
    if args.predictions:
        print(f"predictions: {args.predictions}")


def cmd_export(args) -> None:
    from peftlab.export import export_adapter

    print(f"adapter written to {export_adapter(args.run_dir, args.out)}")


def cmd_merge(args) -> None:
    from peftlab.export import merge_run

    print(f"merged model written to {merge_run(args.run_dir, args.out)} (task head: head.safetensors)")


def cmd_generate(args) -> None:
    from peftlab.generator import load_generator

    g = load_generator(args.source, chat=args.chat)
    stop = tuple(args.stop) if args.stop is not None else g.stop_strings
    stream = len(args.prompt) == 1 and not args.no_stream
    texts = g.generate(args.prompt, max_new_tokens=args.max_new_tokens, sampling=Sampling(**_pick(args, Sampling)),
                       stop_strings=stop, seed=args.seed, stream=sys.stdout if stream else None,
                       precision=args.precision)
    if not stream:
        for prompt, text in zip(args.prompt, texts):
            print(f"### {prompt}\n{text}\n")


def cmd_icl(args) -> None:
    from peftlab.icl import parse_shots, run_icl

    run_icl(args.model, args.task, parse_shots(args.shots), args.repeats, args.limit, args.seed, args.out,
            args.batch_size, args.max_length, precision=args.precision)


def cmd_run(args) -> None:
    from peftlab.lab import Experiment, experiment_dir, print_runs, run_experiment
    from peftlab.report import write_report

    rows = run_experiment(args.experiment, args.out)
    print_runs(rows)
    if any(r["status"] == "done" for r in rows):
        md, page = write_report(experiment_dir(Experiment.load(args.experiment), args.out))
        print(f"report: {page} ({md})")


def cmd_report(args) -> None:
    from peftlab.report import write_report

    md, page = write_report(args.exp_dir)
    print(f"report: {page} ({md})")


def cmd_runs(args) -> None:
    from peftlab.lab import print_runs, query

    print_runs(query(args.exp_dir, args.where, args.sort))


def cmd_models(args) -> None:
    for name, what in EMBEDDED.items():
        print(f"{name:14s} {what}")


def cmd_inspect(args) -> None:
    from peftlab.models import inspect_model

    print(inspect_model(args.model))


LIGHT = {"models"}  # commands that load no model: they answer without importing torch
COMMANDS = {"run": cmd_run, "report": cmd_report, "runs": cmd_runs, "icl": cmd_icl, "generate": cmd_generate, "train": cmd_train, "compare": cmd_compare, "eval": cmd_eval, "export": cmd_export,
            "merge": cmd_merge, "models": cmd_models, "inspect": cmd_inspect}

if __name__ == "__main__":
    sys.exit(main())
