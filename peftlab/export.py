"""Getting trained work out of a run directory: as a PEFT-layout adapter, or merged into a
plain transformers model that loads with `AutoModel*.from_pretrained` and no peftlab."""

import shutil
from pathlib import Path

from torch import nn

from peftlab.checkpoint import save_weights
from peftlab.errors import PeftlabError
from peftlab.methods import merge, parse_method
from peftlab.models import HUB_IDS
from peftlab.multitask import TaskPrompts
from peftlab.peft_format import save_adapter
from peftlab.saved import check_outside_runs, load_run


def _one_adapter(cfg, p) -> None:
    if cfg.per_task_adapters or isinstance(p.model.prompt, TaskPrompts):
        raise PeftlabError(f"'{cfg.task}' trained one adapter or soft prompt per task; PEFT layout and merged "
                           "weights hold one: train without per-task parts to export or merge")


def export_adapter(run_dir: str | Path, out: str | Path) -> Path:
    """Write a run's adapter in HF PEFT layout (adapter_config.json, adapter_model.safetensors, head)."""
    check_outside_runs(out)
    cfg, p = load_run(run_dir)
    _one_adapter(cfg, p)
    method = parse_method(cfg.method, cfg.method_args)
    # a fresh parse is stateless: the loaded model already carries the method's modules
    save_adapter(out, method, p.model, p.backbone.model, p.trainable, HUB_IDS.get(cfg.model, cfg.model))
    return Path(out)


def unwrap(body: nn.Module) -> None:
    """Replace every merged wrapper (a module with a `base_layer`) by its base layer."""
    for name, module in list(body.named_modules()):
        if hasattr(module, "base_layer"):
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, module.base_layer)


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    """Fold a run's changes into the base weights and save a plain transformers model + its head."""
    check_outside_runs(out)
    cfg, p = load_run(run_dir)
    _one_adapter(cfg, p)
    extra = sorted({n.split(".")[0] for n, _ in p.model.named_parameters()} - {"body", "head"})
    if extra:
        raise PeftlabError(f"'{cfg.method}' adds modules that do not fold into the base weights ({', '.join(extra)}); "
                           "use `peftlab export` for an adapter instead")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PeftlabError(f"'{out}' already exists and is not empty; give merge a new --out (or delete it)")
    merge(p.model)
    unwrap(p.model.body)
    partial = out.with_name(f".{out.name}.partial")  # renamed when whole: a failed merge leaves no half model
    shutil.rmtree(partial, ignore_errors=True)
    p.backbone.model.save_pretrained(partial)
    p.backbone.tokenizer.save_pretrained(partial)
    save_weights(partial / "head.safetensors", {k: v for k, v in p.model.head.state_dict().items()})
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
