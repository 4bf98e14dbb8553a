"""Selective fine-tuning: train a chosen subset of the pretrained weights, inject nothing.

  full             every weight
  head             only the task head (the backbone is a frozen feature extractor)
  last-N / first-N / middle-N
                   N transformer blocks at the top, the bottom or the centre
  last-block+norm  the last block and the final norm (the GPT-2 spam study's best cheap setting)
  bias             every bias term (BitFit, Ben Zaken et al. 2021)
The task head always trains as well; the caller adds it.
"""

import re
from dataclasses import dataclass

from torch import nn

from peftlab.errors import PeftlabError

SELECTIVE_SPECS = [
    ("full", "full"), ("head", "head"), (r"(last|first|middle)-\d+", "last-N, first-N, middle-N"),
    ("last-block\\+norm", "last-block+norm"), ("bias", "bias"),
]


@dataclass
class Selective:
    kind: str  # full | head | last | first | middle | last-block+norm | bias
    n: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.n}" if self.kind in ("last", "first", "middle") else self.kind

    @property
    def default_lr(self) -> float:
        # For the pretrained weights (the head has its own, larger --head-lr): full fine-tuning
        # moves many weights and wants the smallest step; biases alone tolerate a large one.
        return {"head": 1e-2, "bias": 1e-3, "full": 2e-5}.get(self.kind, 5e-5)

    def apply(self, model: nn.Module) -> None:
        pass

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        arch = model.arch
        blocks = list(arch.blocks)
        if self.kind == "full":
            return list(arch.body.parameters())
        if self.kind == "head":
            return []
        if self.kind == "bias":
            biases = [p for n, p in arch.body.named_parameters() if n.endswith(".bias")]
            if not biases:
                raise PeftlabError(f"'bias' (BitFit) needs bias terms, and this {arch.model_type} model has "
                                   "none; choose another method, e.g. last-block+norm")
            return biases
        if self.kind == "last-block+norm":
            norm = [arch.final_norm] if arch.final_norm is not None else []
            return [p for m in [blocks[-1], *norm] for p in m.parameters()]
        if not 1 <= self.n <= len(blocks):
            raise PeftlabError(f"'{self.name}' asks for {self.n} blocks; the model has {len(blocks)}: "
                               f"use N from 1 to {len(blocks)}")
        start = {"last": len(blocks) - self.n, "first": 0, "middle": (len(blocks) - self.n) // 2}[self.kind]
        return [p for b in blocks[start:start + self.n] for p in b.parameters()]


def parse_selective(spec: str) -> Selective:
    m = re.fullmatch(r"(last|first|middle)-(\d+)", spec)
    if m:
        if int(m.group(2)) < 1:
            raise PeftlabError(f"'{spec}': N must be at least 1")
        return Selective(m.group(1), int(m.group(2)))
    return Selective(spec)
