"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): n learned vectors prepended to the
input embeddings; the whole network stays frozen. In the unified view: extra input vectors.

Initialisation: from the embeddings of a text (repeated to fill n tokens, as HF PEFT's
`prompt_tuning_init_text`), of random vocabulary tokens, or random at the embeddings' scale.
"""

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError

INITS = ("text", "vocab", "random")


@dataclass
class VirtualTokens:
    """What prompt and prefix tuning share: n virtual tokens in the first positions of the context."""

    n: int = 20

    @property
    def positions(self) -> int:
        """Context positions the virtual tokens take before the text."""
        return self.n

    def __post_init__(self) -> None:
        if self.n < 1:
            raise PeftlabError(f"--virtual-tokens must be at least 1, got {self.n}")

    def claim(self, model: nn.Module, part: str, what: str) -> None:
        """Refuse a second method of this kind (`model.<part>` set) and more tokens than the context has."""
        if getattr(model, part, None) is not None:
            raise PeftlabError(f"the model already has {what}; a spec may hold one {part} method")
        limit = getattr(model.arch.body.config, "max_position_embeddings", None)
        if limit is not None and self.n >= limit:
            raise PeftlabError(f"--virtual-tokens {self.n} leaves no room for text in this model's {limit}-position "
                               f"context; use fewer, e.g. --virtual-tokens {min(20, limit // 2)}")


class SoftPrompt(nn.Module):
    """(B,) -> (B, n, H) virtual input embeddings. `embedding` matches HF PEFT's PromptEmbedding."""

    same_in_every_row = True  # so a batch may compute it once (`virtual.shares_rows`)

    def __init__(self, n: int, init: torch.Tensor):
        super().__init__()
        self.n = n
        self.embedding = nn.Embedding(n, init.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


def init_vectors(n: int, embeddings: nn.Embedding, how: str, text: str | None, tokenizer, seed: int = 0
                 ) -> torch.Tensor:
    table = embeddings.weight.detach()
    g = torch.Generator().manual_seed(seed)
    if how == "text":
        if not text:
            raise PeftlabError("--prompt-init text needs --prompt-text, e.g. 'Classify the sentiment'")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PeftlabError(f"--prompt-text '{text}' tokenizes to nothing; give some words")
        ids = (ids * (n // len(ids) + 1))[:n]
        return table[torch.tensor(ids)].clone()
    if how == "vocab":
        return table[torch.randint(0, table.shape[0], (n,), generator=g)].clone()
    if how == "random":
        return torch.randn(n, table.shape[1], generator=g) * table.std()
    raise PeftlabError(f"--prompt-init '{how}' is unknown; valid: text, vocab, random")


@dataclass
class PromptTuning(VirtualTokens):
    init: str = "vocab"
    text: str | None = None
    # 3e-2 (HF PEFT's examples) moves SmolLM2's vectors ~20% of the embeddings' std a step and,
    # beside a fresh head, made runs chaotic: SST-2 73.3 / 50.0, SMS spam macro-F1 88.1 / 72.4 /
    # 58.9 by seed; 1e-2 gave 79.0 / 76.3 and 94.5 / 91.4 / 94.8 (docs/benchmarks.md).
    default_lr: float = 1e-2
    name: str = "prompt"
    reads = ("virtual_tokens", "prompt_")  # the MethodArgs it reads, by prefix

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:  # fail before the model loads
            raise PeftlabError(f"--prompt-init '{self.init}' is unknown; valid: {', '.join(INITS)}")

    def apply(self, model: nn.Module) -> None:
        self.claim(model, "prompt", "a soft prompt")
        if self.init == "text" and model.tokenizer is None:
            raise PeftlabError("--prompt-init text needs the model's tokenizer; build the model from a backbone")
        # the run's seed (prepare seeds torch with it): seeds draw different vocabulary tokens
        init = init_vectors(self.n, model.arch.embeddings, self.init, self.text, model.tokenizer, torch.initial_seed())
        model.prompt = SoftPrompt(self.n, init.to(model.arch.embeddings.weight))

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.prompt.parameters())

    def peft_config(self, model: nn.Module) -> dict:
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": self.n, "prompt_tuning_init": "RANDOM",
                "token_dim": model.arch.hidden_size, "num_transformer_submodules": 1}
