"""A classifier = a backbone's body + pooling + a linear head.

Pooling reads one vector per sequence from the body's last hidden states:
  last   the last real (non-pad) token: right for causal LMs, whose last token has seen all
         others; correct under left or right padding
  first  the first real token ([CLS] for BERT-family encoders)
  mean   the mean over real tokens
"""

from typing import Literal

import torch
from torch import nn

from peftlab.arch import Arch
from peftlab.virtual import body_inputs

Pooling = Literal["auto", "last", "first", "mean"]
POOLINGS = ("auto", "last", "first", "mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) 0/1 mask -> (B, H)."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    pos = torch.arange(mask.shape[1], device=mask.device)
    if how == "last":
        idx = (mask * pos).argmax(-1)  # largest position that is real
    elif how == "first":
        idx = mask.argmax(-1)  # smallest position that is real
    else:
        raise ValueError(f"unknown pooling '{how}'; valid: last, first, mean")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class Classifier(nn.Module):
    """Backbone body + pooling + linear head; forward returns (B, num_labels) logits."""

    def __init__(self, arch: Arch, num_labels: int, pooling: Pooling = "auto", tokenizer=None):
        super().__init__()
        self.arch = arch  # plain attribute: handles on the body's parts for the methods
        self.tokenizer = tokenizer  # for methods that start from text (prompt-tuning init)
        self.body = arch.body
        self.prompt: nn.Module | None = None  # virtual input embeddings (prompt tuning)
        self.prefix: nn.Module | None = None  # virtual keys/values (prefix tuning)
        if getattr(self.body, "pooler", None) is not None:
            self.body.pooler = None  # BERT's pooler is unused: we pool last_hidden_state ourselves
        self.causal = arch.causal
        self.pooling = ("last" if arch.causal else "first") if pooling == "auto" else pooling
        self.head = nn.Linear(arch.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=arch.hidden_size**-0.5)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (B, H) features of the body."""
        kw, _, pool_mask = body_inputs(self, input_ids, attention_mask)
        return pool(self.body(**kw).last_hidden_state, pool_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))
