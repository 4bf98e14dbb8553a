"""peftlab: fine-tune pretrained transformers cheaply, and compare the ways of doing it.

    from peftlab import RunConfig, TrainArgs, train_run, compare
    record = train_run(RunConfig(model="smollm2-135m", task="sms_spam", method="last-block+norm",
                                 train_limit=400, train=TrainArgs(epochs=2)))

The names below are imported on first use: torch and transformers take seconds to import, and
`peftlab --help` or a mistyped flag should not wait for them.
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {  # public name -> the module that defines it
    "compare": "comparison", "print_table": "comparison",
    "TASKS": "data", "Task": "data", "load_task": "data",
    "Sampling": "runconfig", "generate": "decode",
    "PeftlabError": "errors",
    "GEN_TASKS": "generation", "GenTask": "generation", "load_gen_task": "generation",
    "Classifier": "heads", "LanguageModel": "heads",
    "parse_method": "methods", "trainable_names": "methods",
    "EMBEDDED": "runconfig", "Backbone": "models", "load_backbone": "models",
    "load_generator": "generator",
    "train_run": "run",
    "RunConfig": "runconfig", "TrainArgs": "runconfig",
    "eval_run": "saved", "load_run": "saved",
}
__all__ = [
    "EMBEDDED", "GEN_TASKS", "TASKS", "Backbone", "Classifier", "GenTask", "LanguageModel", "PeftlabError",
    "RunConfig", "Sampling", "Task", "TrainArgs", "compare", "eval_run", "generate", "load_backbone",
    "load_gen_task", "load_generator", "load_run", "load_task", "parse_method", "print_table", "train_run",
    "trainable_names",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftlab' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"peftlab.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and editors see
    from peftlab.comparison import compare, print_table
    from peftlab.data import TASKS, Task, load_task
    from peftlab.decode import generate
    from peftlab.errors import PeftlabError
    from peftlab.generation import GEN_TASKS, GenTask, load_gen_task
    from peftlab.generator import load_generator
    from peftlab.heads import Classifier, LanguageModel
    from peftlab.methods import parse_method, trainable_names
    from peftlab.models import Backbone, load_backbone
    from peftlab.run import train_run
    from peftlab.runconfig import EMBEDDED, RunConfig, Sampling, TrainArgs
    from peftlab.saved import eval_run, load_run
