"""Adaptation methods. A method is a small object with two hooks:

  apply(model)      change the network in place (inject modules); a no-op for selective tuning
  trainable(model)  the parameters that train (the task head is added by the caller)

Shared code (training, counting, saving) only calls these hooks; it never asks which method
it holds. Adding a method means adding a module here and one entry to `PARSERS`.

A spec may join several methods with '+' ("lora+last-1", "prefix+adapter"); `mam` is He et
al.'s mix-and-match adapter, prefix tuning plus a parallel FFN adapter. A spec may also be a
YAML file listing the parts, each with its own settings (MethodArgs field names):

    method:
      - lora: {lora_r: 4, lora_targets: "q_proj,v_proj"}
      - adapter: {adapter: parallel, adapter_reduction: 8}
"""

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from peftlab.checkpoint import load_yaml
from peftlab.config import build
from peftlab.errors import PeftlabError, unknown
from peftlab.methods.adapters import Adapters
from peftlab.methods.ia3 import IA3
from peftlab.methods.lora import Lora
from peftlab.methods.prefix import PrefixTuning
from peftlab.methods.prompt import PromptTuning
from peftlab.methods.selective import SELECTIVE_SPECS, Selective, parse_selective
from peftlab.runconfig import MethodArgs


class Method(Protocol):
    name: str
    default_lr: float

    def apply(self, model: nn.Module) -> None: ...

    def trainable(self, model: nn.Module) -> list[nn.Parameter]: ...


def _lora(spec: str, a: MethodArgs) -> Lora:
    return Lora(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets, rslora=a.rslora)


# (pattern, parser, how the spec is written): the first matching pattern parses the spec.
PARSERS: list[tuple[str, Callable[[str, MethodArgs], Method], str]] = [
    *((p, lambda spec, a: parse_selective(spec), shown) for p, shown in SELECTIVE_SPECS),
    ("lora", _lora, "lora"),
    ("prompt", lambda spec, a: PromptTuning(a.virtual_tokens, a.prompt_init, a.prompt_text), "prompt"),
    ("prefix", lambda spec, a: PrefixTuning(a.virtual_tokens, a.prefix_projection, a.prefix_init), "prefix"),
    ("adapter", lambda spec, a: Adapters(a.adapter, a.adapter_reduction, a.adapter_scaling, a.adapter_at), "adapter"),
    ("ia3", lambda spec, a: IA3(), "ia3"),
]


@dataclass
class Mix:
    """Several methods at once: each applies its change; the trainable set is the union."""

    parts: list
    name: str
    settings: tuple[str, ...] | None = None  # the MethodArgs it reads, where not simply its parts'

    @property
    def reads(self) -> tuple[str, ...]:
        return self.settings or tuple(x for p in self.parts for x in getattr(p, "reads", ()))

    @property
    def default_lr(self) -> float:
        return min(p.default_lr for p in self.parts)  # the most delicate part sets the pace

    def apply(self, model: nn.Module) -> None:
        for p in self.parts:
            p.apply(model)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in self.parts:
            seen.update((id(t), t) for t in p.trainable(model))
        return list(seen.values())


ALIASES = {"mam": "prefix+adapter"}


def _parse_one(spec: str, args: MethodArgs) -> Method:
    for pattern, parser, _ in PARSERS:
        if re.fullmatch(pattern, spec):
            return parser(spec, args)
    raise unknown("method", spec, [shown for _, _, shown in PARSERS] + list(ALIASES), "join several with '+'")


def parse_method(spec: str, args: MethodArgs | None = None) -> Method:
    """Turn a method spec such as 'last-2', 'last-block+norm', 'lora+head' or 'mam' into a method."""
    spec, args = spec.strip(), args or MethodArgs()
    if spec.endswith((".yaml", ".yml")):
        return _parse_yaml(Path(spec), args)
    if spec == "mam":
        return Mix([PrefixTuning(args.virtual_tokens, args.prefix_projection, args.prefix_init),
                    Adapters("parallel", args.adapter_reduction, args.adapter_scaling, "ffn")], "mam",
                   # a fixed parallel FFN adapter: placement and sites are its own
                   settings=("virtual_tokens", "prefix_", "adapter_reduction", "adapter_scaling"))
    names = [s.strip() for s in re.split(r"\+(?!norm\b)", spec)]  # last-block+norm is one name
    if len(names) == 1:
        return _parse_one(spec, args)
    if len(set(names)) < len(names):
        raise PeftlabError(f"method '{spec}' names a part twice; list each method once")
    if "full" in names:
        raise PeftlabError(f"method '{spec}' mixes 'full' with others; full already trains every weight")
    return Mix([_parse_one(n, args) for n in names], spec)


def _parse_yaml(path: Path, args: MethodArgs) -> Method:
    doc = load_yaml(path, "method file")
    items = doc.get("method") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise PeftlabError(f"method file '{path}' needs a 'method:' list, e.g. [{{lora: {{lora_r: 8}}}}]")
    parts, names = [], []
    for item in items:
        name, opts = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (item, {})
        if not isinstance(name, str) or not isinstance(opts or {}, dict):
            raise PeftlabError(f"method file '{path}': each entry is a name or {{name: {{settings}}}}, got {item!r}")
        part = build(MethodArgs, {**dataclasses.asdict(args), **(opts or {})}, f"method file '{path}', part '{name}'",
                     unknown="error")
        names.append(name)
        parts.append(parse_method(name, part))
    if len(set(names)) < len(names) or ("full" in names and len(names) > 1):
        raise PeftlabError(f"method file '{path}' lists a part twice or mixes 'full' with others")
    return parts[0] if len(parts) == 1 else Mix(parts, "+".join(names))


def unread_args(method: Method, args: MethodArgs) -> list[str]:
    """Settings changed from their defaults that no part of `method` reads (`--lora-r 4` on a
    head run): worth a warning, since the user meant something that will not happen."""
    prefixes = getattr(method, "reads", ())  # each method names the MethodArgs it reads (by prefix)
    default = MethodArgs()
    return [f.name for f in dataclasses.fields(args)
            if getattr(args, f.name) != getattr(default, f.name) and not f.name.startswith(prefixes or ("\0",))]


def positions(method: Method) -> int:
    """Context positions a method's virtual tokens take (prompt and prefix tuning; 0 for the rest)."""
    return sum(getattr(p, "positions", 0) for p in getattr(method, "parts", [method]))


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


def merge(model: nn.Module) -> int:
    """Fold every mergeable change (LoRA, IA3, prefix MLPs) into plain weights; returns how many.

    Any module with `merge()`/`unmerge()` takes part: shared code needs no list of methods.
    """
    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "unmerge") and m is not model]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "merge") and hasattr(m, "unmerge") and m is not model:
            m.unmerge()


def method_names() -> list[str]:
    return [shown for _, _, shown in PARSERS]


__all__ = ["Lora", "Method", "MethodArgs", "Mix", "Selective", "merge", "method_names", "parse_method",
           "set_trainable", "trainable_names", "unmerge"]
