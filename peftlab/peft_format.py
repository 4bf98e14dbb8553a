"""Adapters in the Hugging Face PEFT layout: `adapter_config.json` + `adapter_model.safetensors`.

An adapter saved here loads with `peft.PeftModel.from_pretrained(base_model, dir)` and gives the
same outputs; an adapter saved by PEFT loads here. Key names are PEFT's: the adapter name is
dropped ("lora_A.default.weight" -> "lora_A.weight"), paths are those of the full HF model under
"base_model.model.", soft prompts and prefixes are "prompt_embeddings". Bottleneck adapters,
which PEFT lacks, use the same two files with peft_type "BOTTLENECK". The task head, which
PEFT keeps elsewhere, is saved beside them as `head.safetensors`. Only safetensors and JSON
are read.
"""

import re
from pathlib import Path

import torch
from torch import nn

from peftlab.checkpoint import load_json, load_weights, pickle_refused, save_json, save_weights
from peftlab.errors import PeftlabError, first_line
from peftlab.methods import Method, Mix
from peftlab.methods.adapters import Adapters
from peftlab.methods.ia3 import IA3
from peftlab.methods.lora import Lora
from peftlab.methods.prefix import PrefixTuning
from peftlab.methods.prompt import PromptTuning
from peftlab.models import same_model

CONFIG, WEIGHTS, HEAD = "adapter_config.json", "adapter_model.safetensors", "head.safetensors"


def peft_config(method: Method, model: nn.Module, base: str) -> dict:
    """The adapter_config.json of a method (one PEFT method per file, as PEFT itself)."""
    if not hasattr(method, "peft_config"):
        raise PeftlabError(f"method '{method.name}' is not an adapter; its run directory's "
                           "trainable.safetensors holds its weights")
    # PEFT applies soft prompts and prefixes only in its task-specific wrappers, so name one
    task = "CAUSAL_LM" if model.arch.causal else "FEATURE_EXTRACTION"
    common = {"base_model_name_or_path": base, "task_type": task, "inference_mode": True, "peft_version": "0.21.2"}
    return {**common, **method.peft_config(model)}


def _body_prefix(backbone_model: nn.Module, body: nn.Module) -> str:
    return "" if backbone_model is body else backbone_model.base_model_prefix + "."


def to_peft_key(name: str, prefix: str) -> str | None:
    """peftlab parameter name -> PEFT key (None: not part of the adapter file)."""
    if name.startswith(("prompt.", "prefix.")):
        return "prompt_embeddings"
    if name.startswith("adapters."):
        return name
    if name.startswith("body."):
        return "base_model.model." + prefix + re.sub(r"\.default(?=\.|$)", "", name[len("body."):])
    return None


def save_adapter(out: str | Path, method: Method, model: nn.Module, backbone_model: nn.Module,
                 trainable: list[str], base: str) -> None:
    """Write the method's weights in PEFT layout, plus the task head."""
    out = Path(out)
    parts = method.parts if isinstance(method, Mix) else [method]
    if len(parts) != 1:
        raise PeftlabError("PEFT's layout holds one method per adapter; export each part of a mix separately")
    config = peft_config(parts[0], model, base)
    prefix = _body_prefix(backbone_model, model.arch.body)
    params = dict(model.named_parameters())
    tensors = {to_peft_key(n, prefix): params[n] for n in trainable if not n.startswith("head.")}
    tensors.update(getattr(parts[0], "peft_tensors", lambda m: {})(model))  # a method's own export form
    tensors.pop(None, None)
    save_weights(out / WEIGHTS, tensors)
    save_weights(out / HEAD, {n: params[n] for n in trainable if n.startswith("head.")})
    save_json(out / CONFIG, config)


def method_from_config(cfg: dict) -> Method:
    kind = cfg.get("peft_type")
    try:
        if kind == "LORA":
            targets = cfg["target_modules"]
            targets = ",".join(targets) if isinstance(targets, list) else targets
            return Lora(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0), targets=targets,
                        rslora=cfg.get("use_rslora", False))
        if kind == "PROMPT_TUNING":
            return PromptTuning(cfg["num_virtual_tokens"], init="random")
        if kind == "PREFIX_TUNING":
            return PrefixTuning(cfg["num_virtual_tokens"])
        if kind == "IA3":
            return IA3()
        if kind == "BOTTLENECK":
            return Adapters(cfg["adapter"], cfg["reduction"], cfg["scaling"], cfg.get("at"))
    except KeyError as e:
        raise PeftlabError(f"{CONFIG} of a {kind} adapter lacks the setting {e}; re-export the adapter") from None
    except TypeError as e:  # a setting of the wrong type, e.g. r: "8"
        raise PeftlabError(f"{CONFIG} of a {kind} adapter has a setting of the wrong type ({e}); "
                           "re-export the adapter") from None
    raise PeftlabError(f"adapter type '{kind}' is not supported; supported: LORA, PROMPT_TUNING, PREFIX_TUNING, "
                       "IA3, BOTTLENECK")


def _check_adapter_dir(path: Path) -> None:
    """An adapter is read from adapter_config.json and safetensors only; pickle files are refused."""
    if not path.is_dir():
        raise PeftlabError(f"adapter directory '{path}' does not exist; give a folder with {CONFIG} and {WEIGHTS}")
    if not (path / CONFIG).is_file():
        raise PeftlabError(f"'{path}' has no {CONFIG}; give a PEFT adapter folder ({CONFIG} + {WEIGHTS})")
    if not (path / WEIGHTS).is_file():
        pickled = path / "adapter_model.bin"
        if pickled.is_file():
            raise pickle_refused(pickled)
        raise PeftlabError(f"'{path}' has no {WEIGHTS}; give a PEFT adapter folder ({CONFIG} + {WEIGHTS})")


def load_adapter(path: str | Path, model: nn.Module, backbone_model: nn.Module, base: str | None = None) -> Method:
    """Apply the adapter in `path` (PEFT layout) to `model` and load its weights; returns the method.

    `base`, when given, is the name of the model loaded: an adapter whose `base_model_name_or_path`
    names another model is refused before anything changes.
    """
    path = Path(path)
    _check_adapter_dir(path)
    cfg = load_json(path / CONFIG)
    if not isinstance(cfg, dict):
        raise PeftlabError(f"'{path / CONFIG}' holds a JSON {type(cfg).__name__}, not an object; re-export the adapter")
    theirs_base = cfg.get("base_model_name_or_path")
    if base and isinstance(theirs_base, str) and theirs_base and not same_model(base, theirs_base):
        raise PeftlabError(f"the adapter in '{path}' was trained on '{theirs_base}', not on '{base}'; load it onto "
                           f"'{theirs_base}' (its base_model_name_or_path)")
    weights = load_weights(path / WEIGHTS)
    method = method_from_config(cfg)
    try:
        method.apply(model)
    except PeftlabError as e:
        raise PeftlabError(f"the adapter in '{path}' does not fit this model ({e}); was it trained on another base "
                           f"model? Its {CONFIG} names '{theirs_base}'") from e
    prefix = _body_prefix(backbone_model, model.arch.body)
    params = dict(model.named_parameters())
    wanted = {to_peft_key(n, prefix): n for n in params if to_peft_key(n, prefix) in weights}
    ours = {id(t) for t in method.trainable(model)}
    missing = [n for n, p in params.items() if id(p) in ours and n not in wanted.values()]
    if missing:
        raise PeftlabError(f"'{path / WEIGHTS}' lacks {len(missing)} tensors of this adapter (e.g. {missing[0]}); "
                           "the file is incomplete or from another base model")
    extra = set(weights) - set(wanted)
    if extra:
        raise PeftlabError(f"'{path / WEIGHTS}' has {len(extra)} tensors this model has no place for "
                           f"(e.g. {min(extra)}); was it trained on another base model?")
    for key, name in wanted.items():  # every shape first: a mismatch leaves no half-loaded model
        if params[name].shape != weights[key].shape:
            raise PeftlabError(f"'{key}' has shape {tuple(weights[key].shape)}, the model expects "
                               f"{tuple(params[name].shape)}; was it trained on another base model?")
    with torch.no_grad():
        for key, name in wanted.items():
            params[name].copy_(weights[key])
    if (path / HEAD).is_file():
        try:
            model.head.load_state_dict({k.removeprefix("head."): v for k, v in load_weights(path / HEAD).items()})
        except RuntimeError as e:  # torch's message for missing keys or other sizes
            raise PeftlabError(f"'{path / HEAD}' does not fit this model's task head ({first_line(e)}); was it "
                               "trained with another label set?") from None
    return method

