"""The one place that knows transformer architectures.

Everything else asks `describe(model)` for the parts it needs (blocks, final norm, embeddings,
LM head, hidden size, causal or not) and never branches on a model's name.
"""

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class Family:
    """Where things are. Paths are dotted; sublayer paths are relative to one block."""

    blocks: str  # the block ModuleList inside the body
    final_norm: str | None  # the norm after the last block (None: post-LN models)
    causal: bool
    attention: str  # the attention sublayer (its input is the sublayer input)
    attn_out: str  # attention's output projection (its output: the sublayer output, before the residual)
    ffn: str  # the first module of the feed-forward sublayer
    ffn_out: str  # the feed-forward output projection
    keys_values: tuple[str, ...]  # projections making keys and values (IA3 rescales them)
    learned_positions: bool = False  # a table of max_position_embeddings positions: no position past it


_DECODER = Family("layers", "norm", True, "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj",
                  ("k_proj", "v_proj"))
_BERT = Family("encoder.layer", None, False, "attention", "attention.output.dense", "intermediate",
               "output.dense", ("key", "value"), True)
FAMILIES: dict[str, Family] = {
    **{t: _DECODER for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3")},
    "gpt2": Family("h", "ln_f", True, "attn", "attn.c_proj", "mlp", "mlp.c_proj", ("c_attn",), True),
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}


@dataclass
class Arch:
    """Handles on the parts of one loaded model. `body` maps input ids to hidden states."""

    model_type: str
    body: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    embeddings: nn.Module
    lm_head: nn.Module | None
    hidden_size: int
    causal: bool
    family: Family


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise PeftlabError(
            f"model type '{model_type}' is not supported yet; supported: {', '.join(sorted(FAMILIES))} "
            "(add an entry to peftlab/arch.py FAMILIES)"
        )
    return FAMILIES[model_type]


def describe(model: nn.Module) -> Arch:
    """Find the parts of a Hugging Face model (a *ForCausalLM / LM-head model or a bare encoder)."""
    config = model.config
    fam = family(config.model_type)
    body = getattr(model, "base_model", model)
    blocks = body.get_submodule(fam.blocks)
    lm_head = model.get_output_embeddings() if model is not body else None
    return Arch(
        model_type=config.model_type,
        body=body,
        blocks=blocks,
        final_norm=body.get_submodule(fam.final_norm) if fam.final_norm else None,
        embeddings=body.get_input_embeddings(),
        lm_head=lm_head,
        hidden_size=config.hidden_size,
        causal=fam.causal,
        family=fam,
    )


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block or one of its sublayers was called with (a forward pre-hook's
    args and kwargs)."""
    return args[0] if args else kwargs["hidden_states"]
