"""peftlab: fine-tune pretrained transformers cheaply, and compare the ways of doing it.

    from peftlab import RunConfig, TrainArgs, train_run, compare
    record = train_run(RunConfig(model="smollm2-135m", task="sms_spam", method="last-block+norm",
                                 train_limit=400, train=TrainArgs(epochs=2)))
"""

from peftlab.compare import compare, print_table
from peftlab.data import TASKS, Task, load_task
from peftlab.decode import Sampling, generate
from peftlab.errors import PeftlabError
from peftlab.generation import GEN_TASKS, GenTask, load_gen_task
from peftlab.heads import Classifier, LanguageModel
from peftlab.methods import parse_method, trainable_names
from peftlab.models import EMBEDDED, Backbone, load_backbone
from peftlab.generator import load_generator
from peftlab.run import train_run
from peftlab.runconfig import RunConfig
from peftlab.saved import eval_run, load_run
from peftlab.train import TrainArgs

__all__ = [
    "EMBEDDED", "GEN_TASKS", "TASKS", "Backbone", "Classifier", "GenTask", "LanguageModel", "PeftlabError",
    "RunConfig", "Sampling", "Task", "TrainArgs", "compare", "eval_run", "generate", "load_backbone",
    "load_gen_task", "load_generator", "load_run", "load_task", "parse_method", "print_table", "train_run",
    "trainable_names",
]
