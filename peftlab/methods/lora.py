"""LoRA (Hu et al. 2021, arXiv:2106.09685): a low-rank update added in parallel to a projection.

    h = W x + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r), B = 0 at init

In the unified view (He et al. 2021) LoRA is a parallel, low-rank additive change at a
projection. `LoraLayer` wraps an `nn.Linear` or GPT-2's `Conv1D` (which stores W transposed),
holds any number of named adapters, and merges/unmerges them into W exactly. For GPT-2's fused
`c_attn` a target such as `c_attn:q,v` adapts only the query and value thirds of the output,
as the LoRA paper did.
"""

import copy
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.parallel import sharded
from peftlab.runconfig import DEFAULT_TARGETS
from peftlab.speed import bf16_weights, casts_once
from peftlab.virtual import rows_by_index


class LoraLayer(nn.Module):
    """A frozen projection plus named low-rank adapters.

    Attribute names follow HF PEFT (`base_layer`, `lora_A`, `lora_B`) so state dicts map 1:1.
    `active` lists the adapters applied in forward; `row_adapters`, when set, gives one adapter
    name (or None for the base) per batch row, for mixed batches.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D weight is (in, out)
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.out_rows: dict[str, torch.Tensor | None] = {}  # output features an adapter writes to
        self.active: list[str] = []
        self.merged: list[str] = []
        self.row_adapters: list[str | None] | None = None

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
            parts: tuple[int, ...] | None = None, n_parts: int = 3) -> None:
        """Add adapter `name`; `parts` picks chunks of a fused output (e.g. (0, 2): q and v of qkv)."""
        rows = None
        if parts is not None:
            size = self.out_features // n_parts
            rows = torch.cat([torch.arange(p * size, (p + 1) * size) for p in parts])
        out = self.out_features if rows is None else len(rows)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        nn.init.zeros_(self.lora_B[name].weight)  # the adapted model starts equal to the base
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self.out_rows[name] = rows
        w = self.base_layer.weight
        self.lora_A[name].to(w.device, w.dtype)
        self.lora_B[name].to(w.device, w.dtype)

    def copy_adapter(self, source: str, name: str) -> None:
        """Add adapter `name` as a copy of adapter `source` (same weights, rank, scaling, rows)."""
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            table[name] = copy.deepcopy(table[source])
        self.scaling[name], self.out_rows[name] = self.scaling[source], self.out_rows[source]

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name], self.out_rows[name]
        self.active = [a for a in self.active if a != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The (out, in) update scaling * B A, scattered into the adapter's output rows."""
        ba = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        rows = self.out_rows[name]
        if rows is not None:
            full = ba.new_zeros(self.out_features, self.in_features)
            full[rows] = ba
            ba = full
        return ba.T if self.fan_in_fan_out else ba

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold the named adapter (default: every active one) into the base weight."""
        for n in [name] if name else list(self.active):
            if n not in self.merged:
                self.base_layer.weight += self.delta_weight(n)
                self.merged.append(n)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        """Take the named adapter (default: every merged one) back out of the base weight."""
        for n in [name] if name else list(self.merged):
            if n in self.merged:
                self.base_layer.weight -= self.delta_weight(n)
                self.merged.remove(n)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
        rows = self.out_rows[name]
        if rows is None:
            return d
        full = d.new_zeros(*d.shape[:-1], self.out_features)
        full[..., rows.to(d.device)] = d
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.row_adapters is not None:
            assert not self.merged, "unmerge adapters before running a mixed batch"
            for name in set(self.row_adapters) - {None}:
                idx = [i for i, a in enumerate(self.row_adapters) if a == name]
                out[idx] = out[idx] + self._delta(name, x[idx])
            return out
        for name in self.active:
            if name in self.merged:
                continue
            if isinstance(self.lora_dropout[name], nn.Identity) and self.out_rows[name] is None:
                out = self._add_fast(out, name, x)
            else:
                out = out + self._delta(name, x)
        return out

    def _add_fast(self, out: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """out + s B A x without dropout: the scaling goes into B (r x out values, not tokens x out)
        and the add into the second GEMM (addmm), saving two passes over the output."""
        a = F.linear(x, self.lora_A[name].weight)
        b = self.lora_B[name].weight * self.scaling[name]
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), a.reshape(-1, a.shape[-1]), b.T.to(a.dtype))
        return flat.view(out.shape)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@dataclass
class Target:
    pattern: str  # module-name suffix or regex; "all-linear" for every Linear/Conv1D
    parts: tuple[int, ...] | None = None  # chunks of a fused qkv output


def parse_targets(spec: str) -> list[Target]:
    """'q_proj,v_proj' -> two targets; 'c_attn:q,v' -> the q and v thirds of c_attn."""
    out: list[Target] = []
    for tok in re.split(r",(?![qkv](?:,|$))", spec):
        tok = tok.strip()
        if not tok:
            continue
        if ":" in tok:
            name, parts = tok.split(":", 1)
            bad = set(parts.split(",")) - set("qkv")
            if bad:
                raise PeftlabError(f"LoRA target '{tok}': parts must be among q,k,v, got {sorted(bad)}")
            out.append(Target(name, tuple(sorted("qkv".index(p) for p in parts.split(",")))))
        else:
            out.append(Target(tok))
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


@dataclass
class Lora:
    """The LoRA method: inject adapter `adapter` into every matching projection of the body."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    rslora: bool = False
    adapter: str = "default"
    default_lr: float = 1e-3
    reads = ("lora_", "rslora")  # the MethodArgs it reads, by prefix

    def __post_init__(self) -> None:
        if self.r < 1:
            raise PeftlabError(f"--lora-r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise PeftlabError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:  # 0 would train B against a zero scaling: the adapter never moves
            raise PeftlabError(f"--lora-alpha must be positive (scaling = alpha / r), got {self.alpha}")
        for t in parse_targets(self.targets):  # fail before any loading
            try:
                re.compile(t.pattern)
            except re.error as e:
                raise PeftlabError(f"--lora-targets '{t.pattern}' is neither a module name nor a valid regular "
                                   f"expression ({e}); e.g. q_proj,v_proj or '.*_proj'") from None

    @property
    def name(self) -> str:
        return "lora"

    def apply(self, model: nn.Module) -> None:
        body = model.arch.body
        targets = parse_targets(self.targets)
        wrapped = [n for n, m in body.named_modules() if isinstance(m, LoraLayer)]
        # candidates: plain projections, and LoraLayers (a further adapter joins the same layer)
        linear = [(n, m) for n, m in body.named_modules() if isinstance(m, (nn.Linear, Conv1D, LoraLayer))
                  and not any(n.startswith(w + ".") for w in wrapped)]
        hits = 0
        for name, module in linear:
            outer = name.removesuffix(".base_layer")  # the projection's own name when another wrapper holds it
            hit = next((t for t in targets if t.pattern == "all-linear" or _matches(outer, t.pattern)), None)
            if hit is None:
                continue
            if outer != name:  # ia3 wrapped it (LoraLayers' own base layers are not candidates)
                raise PeftlabError(f"'{outer}' is already adapted by another method (ia3?); give lora other "
                                   f"targets than '{outer.rsplit('.', 1)[-1]}' (--lora-targets) or drop one")
            layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
            if self.adapter in layer.lora_A:
                raise PeftlabError(f"adapter '{self.adapter}' already exists on {name}; pick another name")
            layer.add(self.adapter, self.r, self.alpha, self.dropout, self.rslora, hit.parts)
            layer.active = [self.adapter]
            if layer is not module:
                parent, _, child = name.rpartition(".")
                setattr(body.get_submodule(parent) if parent else body, child, layer)
            hits += 1
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
            raise PeftlabError(f"--lora-targets '{self.targets}' matched no projection of this model; "
                               f"its linear layers are named: {', '.join(names)} (or use all-linear)")

    def peft_config(self, model: nn.Module) -> dict:
        """This adapter's fields of a HF PEFT adapter_config.json."""
        layers = {n: m for n, m in model.arch.body.named_modules()
                  if isinstance(m, LoraLayer) and self.adapter in m.lora_A}
        if any(m.out_rows[self.adapter] is not None for m in layers.values()):
            raise PeftlabError("LoRA on parts of a fused qkv (c_attn:q,v) has no PEFT equivalent; "
                               "train with --lora-targets c_attn to export in PEFT layout")
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "use_rslora": self.rslora,
                "bias": "none", "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
                "init_lora_weights": True}

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for layer in lora_layers(model.arch.body) if self.adapter in layer.lora_A
                for p in (*layer.lora_A[self.adapter].parameters(), *layer.lora_B[self.adapter].parameters())]


def set_active(model: nn.Module, *names: str) -> None:
    """Apply exactly these adapters in forward (several add up)."""
    for layer in lora_layers(model):
        missing = [n for n in names if n not in layer.lora_A]
        if missing:
            raise PeftlabError(f"adapter(s) {missing} do not exist; present: {sorted(layer.lora_A)}")
        unmerge_needed = [m for m in layer.merged if m not in names]
        for m in unmerge_needed:
            layer.unmerge(m)
        layer.active = list(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    for layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete(name)


@contextmanager
def disabled(model: nn.Module):
    """Run the base model alone inside the block (merged adapters are taken out and put back)."""
    layers = lora_layers(model)
    saved = [(layer, list(layer.active), list(layer.merged)) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.active = []
    try:
        yield
    finally:
        for layer, active, merged in saved:
            layer.active = active
            for name in merged:
                layer.merge(name)


@contextmanager
def per_row(model: nn.Module, adapters: list[str | None]):
    """A mixed batch: row i runs through adapter adapters[i] (None: the base model). The body runs
    padded meanwhile: rows are routed by their index in the batch."""
    layers = lora_layers(model)
    for layer in layers:
        layer.row_adapters = adapters
    try:
        with rows_by_index():
            yield
    finally:
        for layer in layers:
            layer.row_adapters = None


@contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[bool]:
    """Inside, a model whose LoRA layers each have one active adapter runs them folded into the
    weights: one GEMM per projection instead of three. Yields whether it merged.

    The merged weight is a new tensor and the original is put back as it was, bit for bit
    (subtracting the update again would leave rounding in the frozen weights, and a resumed run
    would no longer equal an uninterrupted one). Nothing is merged when a layer has several
    active adapters, per-row routing or merged adapters already, when the model is sharded
    (FSDP), or when a projection reads a bf16 copy of its weight (`speed.bf16_weights`, made
    before the merge: it would not see it).
    """
    layers = lora_layers(model)
    if not layers or sharded(model) or any(
            len(layer.active) != 1 or layer.merged or layer.row_adapters is not None
            or casts_once(layer.base_layer) for layer in layers):
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                w, name = layer.base_layer.weight, layer.active[0]
                saved.append((layer, w, w.data))
                w.data = w.data + layer.delta_weight(name).to(w.dtype)
                layer.merged.append(name)
        yield True
    finally:
        for layer, w, data in saved:
            w.data = data
            layer.merged.clear()


@contextmanager
def inference_weights(model: nn.Module, precision: str, *extra: nn.Module, pack: bool = False) -> Iterator[bool]:
    """The weights of a forward-only pass (evaluation, decoding): a single active LoRA adapter
    merged (`merged_for_inference`), then under bf16 every projection of `model` and `extra` (an LM
    head outside it) reading a bf16 copy of its weight (`speed.bf16_weights`; `pack`: prepacked,
    for decoding), made after the merge so it holds it. Yields whether it merged."""
    with merged_for_inference(model) as merged, bf16_weights([model, *extra], precision, frozen_only=False,
                                                             pack=pack):
        yield merged
