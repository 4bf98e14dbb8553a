"""Adaptation methods. A method is a small object with two hooks:

  apply(model)      change the network in place (inject modules); a no-op for selective tuning
  trainable(model)  the parameters that train (the task head is added by the caller)

Shared code (training, counting, saving) only calls these hooks; it never asks which method
it holds. Adding a method means adding a module here and one entry to `PARSERS`.
"""

import re
from collections.abc import Callable
from typing import Protocol

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.selective import Selective, parse_selective, SELECTIVE_SPECS


class Method(Protocol):
    name: str
    default_lr: float

    def apply(self, model: nn.Module) -> None: ...

    def trainable(self, model: nn.Module) -> list[nn.Parameter]: ...


# (pattern, parser, how the spec is written): the first matching pattern parses the spec.
PARSERS: list[tuple[str, Callable[[str], Method], str]] = [
    *((p, parse_selective, shown) for p, shown in SELECTIVE_SPECS),
]


def parse_method(spec: str) -> Method:
    """Turn a method spec such as 'last-2' or 'last-block+norm' into a method object."""
    spec = spec.strip()
    for pattern, parser, _ in PARSERS:
        if re.fullmatch(pattern, spec):
            return parser(spec)
    valid = ", ".join(shown for _, _, shown in PARSERS)
    raise PeftlabError(f"unknown method '{spec}'; valid: {valid}")


def trainable_names(model: nn.Module, method: Method, *, train_head: bool = True) -> list[str]:
    """The one answer to "what trains?": names of the method's parameters, plus the task head."""
    chosen = {id(p) for p in method.trainable(model)}
    if train_head:
        chosen |= {id(p) for p in model.head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def set_trainable(model: nn.Module, names: list[str]) -> None:
    """requires_grad on exactly the named parameters."""
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def method_names() -> list[str]:
    return [shown for _, _, shown in PARSERS]


__all__ = ["Method", "Selective", "parse_method", "method_names", "trainable_names", "set_trainable"]
