"""peftlab: fine-tune pretrained transformers cheaply, and compare the ways of doing it.

    from peftlab import RunConfig, TrainArgs, train_run, compare
    record = train_run(RunConfig(model="smollm2-135m", task="sms_spam", method="last-block+norm",
                                 train_limit=400, train=TrainArgs(epochs=2)))
"""

from peftlab.compare import compare, print_table
from peftlab.data import TASKS, Task, load_task
from peftlab.errors import PeftlabError
from peftlab.heads import Classifier
from peftlab.methods import parse_method, trainable_names
from peftlab.models import EMBEDDED, Backbone, load_backbone
from peftlab.run import RunConfig, eval_run, load_run, train_run
from peftlab.train import TrainArgs

__all__ = [
    "EMBEDDED", "TASKS", "Backbone", "Classifier", "PeftlabError", "RunConfig", "Task", "TrainArgs",
    "compare", "eval_run", "load_backbone", "load_run", "load_task", "parse_method", "print_table",
    "train_run", "trainable_names",
]
