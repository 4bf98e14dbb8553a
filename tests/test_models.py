import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.models import EMBEDDED, inspect_model, load_backbone
from tests.conftest import TINY


@pytest.mark.parametrize("name,causal,blocks,norm", [
    ("tiny-gpt2", True, 2, "LayerNorm"), ("tiny-llama", True, 2, "LlamaRMSNorm"), ("tiny-bert", False, 2, None),
])
def test_tiny_models_and_their_parts(name, causal, blocks, norm):
    b = load_backbone(name)
    a = b.arch
    assert a.causal is causal and len(a.blocks) == blocks and a.hidden_size == 64
    assert (type(a.final_norm).__name__ if a.final_norm is not None else None) == norm
    assert a.embeddings.weight.shape == (len(b.tokenizer), 64)
    assert (a.lm_head is not None) is causal
    tok = b.tokenizer
    assert tok.padding_side == tok.truncation_side == ("left" if causal else "right")
    if causal:  # pad is a distinct special token, never EOS, which generation must learn
        assert tok.pad_token_id != tok.eos_token_id
    assert b.model.config.pad_token_id == tok.pad_token_id


def test_each_tiny_model_has_its_own_tokenizer():
    """The tiny models' tokenizer is parsed once per process; every backbone gets its own copy,
    so one test's changes (padding side, added tokens) never reach another's."""
    a, b = load_backbone("tiny-llama").tokenizer, load_backbone("tiny-gpt2").tokenizer
    assert a is not b and a.backend_tokenizer is not b.backend_tokenizer
    a.padding_side = "right"
    a.add_tokens(["<peftlab-test>"])
    c = load_backbone("tiny-llama").tokenizer
    assert c.padding_side == "left" and len(c) == len(b) == len(a) - 1
    assert c("x <peftlab-test>")["input_ids"] != a("x <peftlab-test>")["input_ids"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_deterministic_by_seed(name):
    a, b, c = (load_backbone(name, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)


def test_minilm_is_the_real_encoder():
    b = load_backbone("minilm-l6")
    assert b.arch.model_type == "bert" and len(b.arch.blocks) == 6 and b.arch.hidden_size == 384
    ids = b.tokenizer(["a cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        h = b.model(**ids).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all() and h.std() > 0.1


def test_unknown_model_lists_embedded_names():
    with pytest.raises(PeftlabError, match="unknown model 'no-such-model'.*smollm2-135m.*tiny-bert"):
        load_backbone("no-such-model")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(PeftlabError, match="does not exist"):
        load_backbone(str(tmp_path / "x.gguf"))


def test_inspect_lists_every_block():
    text = inspect_model("tiny-llama")
    assert "block 1" in text and "final norm" in text and "tied to the embeddings" in text
    assert set(EMBEDDED) >= {"smollm2-135m", "minilm-l6", *TINY}
