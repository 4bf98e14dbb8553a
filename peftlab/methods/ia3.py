"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned rescaling of keys, values and the
feed-forward activations. In the unified view: a multiplicative change at a projection.

    keys, values   k = (W_k x) * l_k          (output scaling; l starts at 1)
    feed-forward   h = W_down (a * l_ff)      (input scaling of the FFN output projection)

Parameter names and shapes follow HF PEFT (`ia3_l`: (out, 1) or, feed-forward, (1, in)).
Merging folds l into W exactly.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError


class IA3Layer(nn.Module):
    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer, self.feedforward = base, feedforward
        self.fan_in_fan_out = isinstance(base, Conv1D)
        w = base.weight
        n_in, n_out = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        shape = (1, n_in) if feedforward else (n_out, 1)
        self.ia3_l = nn.ParameterDict({"default": nn.Parameter(torch.ones(shape, dtype=w.dtype, device=w.device))})
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        l = self.ia3_l["default"].flatten()
        return self.base_layer(x * l) if self.feedforward else self.base_layer(x) * l

    @torch.no_grad()
    def _scale(self, factor: torch.Tensor) -> None:
        w = self.base_layer.weight  # (out, in), or (in, out) for Conv1D
        along_in = self.feedforward != self.fan_in_fan_out  # which axis of w the vector runs along
        w.mul_(factor.view(1, -1) if along_in else factor.view(-1, 1))
        bias = getattr(self.base_layer, "bias", None)
        if not self.feedforward and bias is not None:  # output scaling scales the bias too (as PEFT)
            bias.mul_(factor)

    def merge(self) -> None:
        if not self.merged:
            self._scale(self.ia3_l["default"].flatten())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._scale(1 / self.ia3_l["default"].flatten())
            self.merged = False


@dataclass
class IA3:
    default_lr: float = 3e-3
    name: str = "ia3"

    def apply(self, model: nn.Module) -> None:
        fam = model.arch.family
        hits = 0
        for block in model.arch.blocks:
            names = [(n, False) for n, _ in block.named_modules() if n.rsplit(".", 1)[-1] in fam.keys_values]
            for name, ff in names + [(fam.ffn_out, True)]:
                module = block.get_submodule(name)
                if isinstance(module, IA3Layer):
                    raise PeftlabError("the model already has IA3 scalings; a spec may hold one ia3")
                if not isinstance(module, (nn.Linear, Conv1D)):  # e.g. a LoraLayer: one wrapper per projection
                    raise PeftlabError(f"ia3 scales {', '.join([*fam.keys_values, fam.ffn_out.rsplit('.', 1)[-1]])}, "
                                       f"but '{name}' is already adapted by another method (lora?); give that "
                                       "method other targets (e.g. --lora-targets q_proj) or drop one")
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, IA3Layer(module, ff))
                hits += 1
        if not hits:
            raise PeftlabError(f"IA3 found no key/value projections in this {model.arch.model_type} model")

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in model.modules() if isinstance(m, IA3Layer) for p in m.ia3_l.parameters()]

    def peft_config(self, model: nn.Module) -> dict:
        fam = model.arch.family
        ff = fam.ffn_out.rsplit(".", 1)[-1]
        conv = any(m.fan_in_fan_out for m in model.modules() if isinstance(m, IA3Layer))
        return {"peft_type": "IA3", "target_modules": [*fam.keys_values, ff], "feedforward_modules": [ff],
                "fan_in_fan_out": conv}
