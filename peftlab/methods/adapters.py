"""Bottleneck adapters: a small down-project, nonlinearity, up-project module added to a
sublayer (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247;
He et al. 2021, arXiv:2110.04366). In the unified view:

    serial    h = f(x);  h <- h + s * up(act(down(h)))      (adapter reads the sublayer output)
    parallel  h = f(x) + s * up(act(down(x)))               (adapter reads the sublayer input)

at the attention and/or the feed-forward sublayer, always before the residual add.
Placements: houlsby = serial at both, pfeiffer = serial after the FFN only, parallel = parallel
at the FFN (He et al.'s best single placement); `--adapter-at` overrides where.
`up` starts at zero, so the adapted model starts equal to the base.
"""

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.arch import hidden_arg
from peftlab.errors import PeftlabError
from peftlab.runconfig import PLACEMENTS


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, width: int, scaling: float):
        super().__init__()
        self.down, self.up, self.act, self.scaling = nn.Linear(hidden, width), nn.Linear(width, hidden), nn.ReLU(), scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scaling


class AdapterHooks(nn.Module):
    """Holds one block's adapters and the hooks that add them to its sublayers."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._inputs: dict[str, torch.Tensor] = {}

    def attach(self, where: str, form: str, sublayer: nn.Module, out_proj: nn.Module, adapter: Bottleneck) -> None:
        self.adapters[where] = adapter
        if form == "parallel":
            sublayer.register_forward_pre_hook(self._keep_input(where), with_kwargs=True)
        out_proj.register_forward_hook(self._add(where, form))

    def _keep_input(self, where: str):
        def hook(module, args, kwargs):
            self._inputs[where] = hidden_arg(args, kwargs)
        return hook

    def _add(self, where: str, form: str):
        def hook(module, args, out):
            source = out if form == "serial" else self._inputs.pop(where)
            return out + self.adapters[where](source)
        return hook


@dataclass
class Adapters:
    placement: str = "parallel"
    reduction: int = 16
    scaling: float = 1.0
    at: str | None = None  # "attn", "ffn" or "attn,ffn"
    default_lr: float = 1e-3
    name: str = "adapter"
    reads = ("adapter",)  # the MethodArgs it reads, by prefix (a class attribute, not a field)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise PeftlabError(f"--adapter '{self.placement}' is unknown; valid: {', '.join(PLACEMENTS)}")
        if self.reduction < 1:
            raise PeftlabError(f"--adapter-reduction must be at least 1, got {self.reduction}")
        if self.scaling == 0:  # the adapter's output would be multiplied away: `up` never trains
            raise PeftlabError("--adapter-scaling must be non-zero (it scales the adapter's output)")
        bad = set((self.at or "ffn").split(",")) - {"attn", "ffn"}
        if bad:
            raise PeftlabError(f"--adapter-at takes attn, ffn or attn,ffn; got {self.at}")

    def apply(self, model: nn.Module) -> None:
        arch = model.arch
        fam = arch.family
        form, default_at = PLACEMENTS[self.placement]
        places = tuple(self.at.split(",")) if self.at else default_at
        width = max(1, arch.hidden_size // self.reduction)
        if getattr(model, "adapters", None) is not None:
            raise PeftlabError("the model already has bottleneck adapters; a spec may hold one adapter method")
        model.adapters = nn.ModuleList()
        for block in arch.blocks:
            hooks = AdapterHooks()
            for where in places:
                sub, out = (fam.attention, fam.attn_out) if where == "attn" else (fam.ffn, fam.ffn_out)
                hooks.attach(where, form, block.get_submodule(sub), block.get_submodule(out),
                             Bottleneck(arch.hidden_size, width, self.scaling).to(arch.embeddings.weight))
            model.adapters.append(hooks)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.adapters.parameters())

    def peft_config(self, model: nn.Module) -> dict:
        # PEFT has no bottleneck adapters: the same two-file layout, a type of our own
        return {"peft_type": "BOTTLENECK", "adapter": self.placement, "reduction": self.reduction,
                "scaling": self.scaling, "at": self.at}
