"""The one place that knows transformer architectures.

Everything else asks `describe(model)` for the parts it needs (blocks, final norm, embeddings,
LM head, hidden size, causal or not) and never branches on a model's name.
"""

from dataclasses import dataclass

from torch import nn

from peftlab.errors import PeftlabError


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path of the block ModuleList inside the body
    final_norm: str | None  # dotted path of the norm after the last block (None: post-LN models)
    causal: bool


_DECODER = Family("layers", "norm", causal=True)
_BERT = Family("encoder.layer", None, causal=False)
FAMILIES: dict[str, Family] = {
    **{t: _DECODER for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3")},
    "gpt2": Family("h", "ln_f", causal=True),
    "gpt_neox": Family("layers", "final_layer_norm", causal=True),
    "opt": Family("decoder.layers", "decoder.final_layer_norm", causal=True),
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": Family("transformer.layer", None, causal=False),
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
    )
