"""Continuing prompts: a trained generation run (prompts framed as in its training data) or a
plain model (prompts as given), batched or streamed token by token to a terminal."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from peftlab.decode import Sampling, generate, trim_at_stop
from peftlab.errors import PeftlabError
from peftlab.generation import Pairs, complete, encode_pairs
from peftlab.heads import LanguageModel
from peftlab.models import load_backbone
from peftlab.saved import is_run, load_run
from peftlab.virtual import virtual_tokens


@dataclass
class Generator:
    """A model ready to continue prompts: a generation run (prompts framed as in its training
    data) or a plain model (prompts as given)."""

    model: torch.nn.Module
    tokenizer: object
    frame: Callable[[list[str], int], Pairs]  # prompts, new tokens to leave room for -> token ids
    max_new_tokens: int
    stop_strings: tuple[str, ...]

    def generate(self, prompts: list[str], *, max_new_tokens: int | None = None, sampling: Sampling | None = None,
                 stop_strings: tuple[str, ...] | None = None, seed: int = 0, stream: TextIO | None = None,
                 precision: str = "auto") -> list[str]:
        """Continue each prompt; with `stream`, write one prompt's text there as it is decoded
        (`precision`: see `decode.generate`)."""
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n < 1:
            raise PeftlabError(f"--max-new-tokens must be at least 1, got {n}")
        pairs = self.frame(prompts, n)
        if not all(pairs.input_ids):
            raise PeftlabError("a prompt is empty; give some text to continue")
        stops = self.stop_strings if stop_strings is None else stop_strings
        if stream is None:
            return complete(self.model, self.tokenizer, pairs, max_new_tokens=n, sampling=sampling,
                            stop_strings=stops, seed=seed, precision=precision)
        if len(prompts) != 1:
            raise PeftlabError("streaming shows one prompt at a time; give one --prompt or --no-stream")
        printer = StreamPrinter(self.tokenizer, stops, stream)
        ids = torch.tensor([pairs.input_ids[0]])
        self.model.eval()
        generate(self.model, ids, torch.ones_like(ids), n, sampling, stop_ids=(self.tokenizer.eos_token_id,),
                 pad_id=self.tokenizer.pad_token_id, seed=seed, stop_strings=stops, tokenizer=self.tokenizer,
                 on_step=printer, precision=precision)
        return [printer.finish()]


class StreamPrinter:
    """Prints decoded text as tokens arrive: never past a stop string, never half a character."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...], out: TextIO):
        self.tokenizer, self.stops, self.out = tokenizer, stop_strings, out
        self.ids: list[int] = []
        self.shown = ""

    def visible(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = trim_at_stop(text, self.stops)
        if len(cut) == len(text.lstrip()):  # no stop yet: hold back what may begin one
            held = max((k for s in self.stops for k in range(1, len(s)) if cut.endswith(s[:k])), default=0)
            cut = cut[:len(cut) - held]
        return cut.rstrip("\ufffd")  # a multi-byte character still arriving

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.visible()
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self) -> str:
        text = trim_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        return text.strip()


def load_generator(source: str | Path, *, chat: bool = False) -> Generator:
    """A trained generation run directory, or a model (embedded name, path or hub id)."""
    if is_run(source):
        cfg, p = load_run(source)
        if not p.generative:
            raise PeftlabError(f"'{source}' is a classification run; evaluate it with `peftlab eval`")
        tok, task = p.backbone.tokenizer, p.task
        sep = (p.model.head.id,) if cfg.sep_token else ()
        context = getattr(p.backbone.model.config, "max_position_embeddings", 1 << 30) - sum(virtual_tokens(p.model))
        frame = lambda prompts, n: encode_pairs(prompts, [""] * len(prompts), tok, cfg.template or task.template,
                                                min(cfg.max_length, max(context - n, 1)), keep_end=task.keep_end,
                                                sep_ids=sep, chat=cfg.chat, with_targets=False)  # as in training
        return Generator(p.model, tok, frame, cfg.max_new_tokens or task.max_new_tokens, ("\n",))
    b = load_backbone(str(source))
    context = getattr(b.model.config, "max_position_embeddings", 2048)

    def frame(prompts: list[str], n: int) -> Pairs:
        budget = max(context - n, 1)  # the prompt's end, and room for n new tokens
        pairs = encode_pairs(prompts, [""] * len(prompts), b.tokenizer, "{text}", budget, keep_end=True, chat=chat,
                             with_targets=False)
        if pairs.truncated:
            warnings.warn(f"{pairs.truncated} prompt(s) kept only their last {budget} tokens: {source} has {context} "
                          f"positions and {n} are left for new tokens")
        return pairs
    return Generator(LanguageModel(b.arch, b.tokenizer), b.tokenizer, frame, 64, ())
