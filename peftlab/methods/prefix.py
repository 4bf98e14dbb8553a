"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): n learned keys and values in front of
every attention layer's own; the network stays frozen. In the unified view: extra key/value
slots, a change applied in parallel to attention.

With grouped-query attention (Llama, SmolLM2) a prefix has one key and value per KV head, not
per query head. The optional reparameterisation (an MLP over a small embedding, which trains
more stably) is folded into a plain table after training: `fold()`. The table layout is HF
PEFT's PrefixEncoder: (n, layers * 2 * kv_heads * head_dim).
"""

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.methods.prompt import VirtualTokens
from peftlab.virtual import output_cache, shared_cache


class Prefix(nn.Module):
    def __init__(self, n: int, layers: int, kv_heads: int, head_dim: int, projection: int = 0, std: float = 1.0):
        super().__init__()
        self.n, self.layers, self.kv_heads, self.head_dim = n, layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        if projection:
            token_dim = kv_heads * head_dim
            self.embedding = nn.Embedding(n, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection), nn.Tanh(), nn.Linear(projection, width))
        else:
            self.embedding = nn.Embedding(n, width)
            self.transform = None
            nn.init.normal_(self.embedding.weight, std=std)

    def table(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of shape (B, kv_heads, n, head_dim)."""
        t = self.table().view(self.n, self.layers * 2, self.kv_heads, self.head_dim)
        t = t.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, kv, n, d)
        return [(t[2 * i], t[2 * i + 1]) for i in range(self.layers)]

    def cache(self, batch_size: int, config, dtype: torch.dtype | None = None):
        return shared_cache(self.key_values(1), batch_size, config, dtype)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the table it computes: same outputs, no MLP at inference."""
        if self.transform is not None:
            table = self.table()
            self.embedding = nn.Embedding.from_pretrained(table, freeze=False)
            self.transform = None

    merge = fold  # the generic merge() folds prefixes too

    def unmerge(self) -> None:
        """Folding changes no output, so there is nothing to take back."""


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from a model config, GQA-aware."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


@torch.no_grad()
def real_token_key_values(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """The frozen model's own keys and values for n random vocabulary tokens, as a prefix table.

    A prefix that starts as keys/values the layers actually produce leaves attention in its
    trained regime; N(0, 1) noise (PEFT's default) swamped SmolLM2's real keys (docs/benchmarks.md).
    """
    arch = model.arch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch.embeddings.num_embeddings, (1, n), generator=g)
    cache = output_cache(arch.body(input_ids=ids, use_cache=True))
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(len(arch.blocks))]
    kv = torch.stack([t[0] for pair in layers for t in pair])  # (2L, kv_heads, n, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(n, -1)  # PEFT's (n, L * 2 * kv_heads * head_dim) layout


@dataclass
class PrefixTuning(VirtualTokens):
    projection: int = 0
    init: str = "tokens"  # tokens: real keys/values of random tokens; random: N(0, 1) as HF PEFT
    default_lr: float = 3e-3
    name: str = "prefix"
    reads = ("virtual_tokens", "prefix_")  # the MethodArgs it reads, by prefix

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection < 0:
            raise PeftlabError(f"--prefix-projection must be >= 0 (0: no MLP), got {self.projection}")
        if self.init not in ("tokens", "random"):
            raise PeftlabError(f"--prefix-init '{self.init}' is unknown; valid: tokens, random")

    def apply(self, model: nn.Module) -> None:
        self.claim(model, "prefix", "a prefix")
        layers, kv, d = kv_shape(model.arch.body.config)
        model.prefix = Prefix(self.n, layers, kv, d, self.projection)
        if self.init == "tokens" and not self.projection and model.arch.causal:
            with torch.no_grad():
                model.prefix.embedding.weight.copy_(real_token_key_values(model, self.n, torch.initial_seed()))

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.prefix.parameters())

    def peft_config(self, model: nn.Module) -> dict:
        p = model.prefix
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": self.n, "prefix_projection": False,
                "token_dim": p.kv_heads * p.head_dim, "num_attention_heads": p.kv_heads, "num_layers": p.layers,
                "num_transformer_submodules": 1}

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": model.prefix.table().detach()}  # folded: PEFT reads a plain table
