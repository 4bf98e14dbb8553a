"""Fast by default on a CPU: glibc's allocator kept from returning memory every step, and bf16
autocast where the processor has bf16 instructions (fp32 stays available, and is the reference
for correctness)."""

import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from peftlab.errors import PeftlabError
from peftlab.parallel import sharded
from peftlab.runconfig import PRECISIONS

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory in the heap instead of handing it back to the kernel.

    By default glibc mmaps each large activation and unmaps it when freed, so every training
    step pays the kernel to zero fresh pages (~18% of a LoRA step on SmolLM2 here). This is what
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1G MALLOC_TOP_PAD_=256M do, set from inside the
    process. PEFTLAB_DEFAULT_MALLOC=1 leaves the allocator alone. Returns whether it was tuned.
    """
    if platform.system() != "Linux" or os.environ.get("PEFTLAB_DEFAULT_MALLOC"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl...)
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 1 << 28)))


def release_memory() -> None:
    """Hand the heap's free memory back to the kernel (glibc malloc_trim): once, between runs,
    not every step."""
    if platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 matmul instructions (AVX512-BF16 or AMX); without them bf16 is emulated, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: str = "cpu") -> str:
    """'auto' -> 'bf16' where the device computes in bf16 natively, else 'fp32'."""
    if precision not in PRECISIONS:
        raise PeftlabError(f"--precision '{precision}' is unknown; valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    native = torch.cuda.is_bf16_supported() if device.startswith("cuda") else cpu_has_bf16()
    return "bf16" if native else "fp32"


def in_fp32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """No autocast inside: for small layers whose outputs must be exact (a task head: bf16's 8-bit
    mantissa on 576 features moves logits enough to flip close calls, costing 20 points of SST-2
    accuracy on SmolLM2's pooled features), at no speed cost."""
    return torch.autocast(x.device.type, enabled=False)


def autocast(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """Matmuls in bf16 (weights stay fp32, as do the optimizer and norms) or nothing."""
    if resolve(precision, device) == "bf16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bf16_autocast(x: torch.Tensor) -> bool:
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


@functools.cache
def _onednn_packing() -> bool:
    """oneDNN's linear on a prepacked bf16 weight (what inductor runs for frozen weights) is here."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _fast_forward(mod: nn.Module, pack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`mod`'s forward, reading a bf16 copy of its weight under bf16 autocast (which would cast
    the fp32 weight to the same values) and its own weight otherwise. The copy is made at the
    first bf16 call, so a module the scope never runs (a cached bottom) costs nothing. With
    `pack`, calls that record no gradients on the CPU read the copy prepacked for oneDNN instead:
    bitwise the same outputs, without repacking the weight in every call (a matrix-vector product
    when decoding runs 1.4x faster, the weights streamed from memory)."""
    own, copies = type(mod).forward, {}
    conv = isinstance(mod, Conv1D)  # GPT-2: x @ W + b, W stored (in, out)

    def copy(kind: str):  # "plain": the bf16 weight; "packed": (prepacked weight, bf16 bias)
        if kind not in copies:
            with torch.inference_mode(False):  # a normal tensor: a later training step saves it for backward
                w = mod.weight.detach().to(torch.bfloat16)
                if kind == "packed":
                    w = (torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if conv else w),
                         None if mod.bias is None else mod.bias.detach().to(torch.bfloat16))
                copies[kind] = w
        return copies[kind]

    def forward(x):
        if not _bf16_autocast(x):
            return own(mod, x)
        if pack and x.device.type == "cpu" and not torch.is_grad_enabled():
            w, b = copy("packed")
            flat = x.to(torch.bfloat16).reshape(-1, x.shape[-1]).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, w, b, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])
        if conv:
            out = torch.addmm(mod.bias, x.reshape(-1, x.shape[-1]), copy("plain"))
            return out.view(*x.shape[:-1], mod.nf)
        return F.linear(x, copy("plain"), mod.bias)
    return forward


def casts_once(mod: nn.Module) -> bool:
    """Whether `mod` reads a bf16 copy of its weight (inside a `bf16_weights` scope)."""
    return "forward" in vars(mod)


@contextlib.contextmanager
def bf16_weights(modules: Iterable[nn.Module], precision: str = "bf16", frozen_only: bool = True,
                 pack: bool = False) -> Iterator[int]:
    """Inside, every frozen fp32 projection (nn.Linear, GPT-2's Conv1D) among `modules` and
    their children also holds its weight as a bf16 copy, made once (at its first bf16 call),
    that its forward uses under bf16 autocast; yields how many projections take part.
    `frozen_only=False` (evaluation, decoding, feature caches: nothing trains meanwhile) takes
    every projection. `pack` (decoding) holds the copies prepacked for oneDNN's bf16 GEMM where
    no gradients are recorded on a CPU that has it (`_fast_forward`): 1.2-1.3x faster decoding,
    but it costs memory (a prompt-tuning run that evaluated prepacked peaked ~270 MiB higher, for
    evaluation 6-8% faster), so evaluation does without.

    Autocast caches its casts only for tensors that require grad, so without this every frozen
    weight is cast again in every forward: a LoRA step reads and writes the whole model once
    more, and a decoding step, which reads each weight once, pays the cast three times over
    (fp32 read, bf16 write, bf16 read). Outputs are bitwise the same (autocast rounds alike), and
    so is every path outside bf16 autocast: those still read the fp32 weight, which stays the
    reference (saved, merged into, trained if unfrozen later). The copies cost half the frozen
    weights' size, which autocast's own casts, saved for backward, already take in a training
    step. Weights must not change inside (no merging or loading): the copies would go stale.
    A no-op unless `precision` resolves to bf16, and for a model sharded by FSDP.
    """
    modules = list(modules)
    swapped: list[nn.Module] = []
    pack = pack and _onednn_packing()
    if resolve(precision) == "bf16" and not any(sharded(r) for r in modules):
        seen: set[int] = set()
        for root in modules:
            for mod in root.modules():
                w = getattr(mod, "weight", None)
                if (type(mod) in (nn.Linear, Conv1D) and id(mod) not in seen and not casts_once(mod)
                        and isinstance(w, nn.Parameter) and not (frozen_only and w.requires_grad)
                        and w.dtype == torch.float32):
                    seen.add(id(mod))
                    mod.forward = _fast_forward(mod, pack)
                    swapped.append(mod)
    try:
        yield len(swapped)
    finally:
        for mod in swapped:
            del mod.forward


FP32_SDPA = "peftlab_fp32_sdpa"


def _fp32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention on the CPU, with two changes for training there:

    - Where it would run in bf16 (under bf16 autocast, or given bf16), the kernel works in fp32 on
      the same bf16-rounded inputs (Llama's rotary embedding hands over q and k in fp32: autocast
      would round them too). The kernel's inputs and output are kept for backward in bf16, so
      the memory is that of bf16 attention.
    - Grouped keys and values go to the kernel as they are (`enable_gqa`), in fp32 too:
      transformers repeats them to every query head whenever there is a mask (padding, or keys
      every row shares in front: a prefix, a soft prompt), which costs 10% of a step on short
      batches and stores 3x the keys and values for backward.

    Anything else (another device, fp32 without a mask or without grouped keys, caches, position
    biases, keys longer than queries without a mask) goes to transformers' own function."""
    cpu = query.device.type == "cpu"
    cpu_bf16 = cpu and (_bf16_autocast(query) or torch.bfloat16 in (query.dtype, value.dtype))
    grouped = query.shape[1] != key.shape[1]
    unusual = (attention_mask is None and key.shape[2] != query.shape[2] or kwargs.get("output_attentions")
               or any(kwargs.get(k) is not None for k in ("cache", "position_bias", "softcap")))
    if unusual or not (cpu_bf16 or cpu and grouped and attention_mask is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = query.shape[2] > 1 and attention_mask is None and (
        getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                              is_causal=causal, enable_gqa=grouped).transpose(1, 2)

    if not cpu_bf16:
        return kernel(query, key, value).contiguous(), None
    with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
        half = [t.to(torch.bfloat16) for t in (query, key, value)]
        full = [t.float() for t in half]
        saved: list[list[torch.Tensor]] = []  # what the kernel keeps for backward, each in a box

        def pack(t: torch.Tensor) -> list[torch.Tensor]:
            saved.append([t])
            return saved[-1]

        def unpack(box: list[torch.Tensor]) -> torch.Tensor:
            return box[0].float() if box[0].dtype == torch.bfloat16 else box[0]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = kernel(*full)  # (B, T, H, D): a view of the kernel's (B, H, T, D)
        half_out = out.to(torch.bfloat16)
        # what it keeps in fp32 and has a bf16 twin of is kept as the twin, at half the memory: the
        # inputs (exact) and the output (the copy returned anyway, as bf16 attention keeps it)
        twins = {t.data_ptr(): h for t, h in zip(full, half)} | {out.data_ptr(): half_out.transpose(1, 2)}
        for box in saved:
            if box[0].dtype == torch.float32 and box[0].data_ptr() in twins:
                box[0] = twins[box[0].data_ptr()]
    return half_out.contiguous(), None


@functools.cache
def _register_fp32_sdpa() -> None:
    AttentionInterface.register(FP32_SDPA, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # the masks SDPA takes


@contextlib.contextmanager
def fp32_attention(modules: Iterable[nn.Module]) -> Iterator[int]:
    """Inside, the SDPA attention of the transformers models among `modules` runs in fp32 under
    bf16 autocast (the projections around it stay bf16), and on grouped keys and values without
    repeating them (`_fp32_sdpa`); yields how many model configs switched.

    For training on the CPU: PyTorch's bf16 flash-attention backward is 4-10x slower than its
    fp32 one here (5.5 ms against 0.8 ms for 16 x 9 heads x 12 tokens; 49 against 27 ms at 128
    tokens), 20% of a LoRA step on short SST-2 batches (torch profiler). Feature caches use it too,
    so a bf16 run's cached features are those its end-to-end epochs would compute. Evaluation and
    decoding keep bf16 attention (its forward is as fast at prefill shapes, and decoded tokens
    equal HF `generate`'s under autocast). In fp32 it only changes how grouped keys reach the
    kernel where there is a mask (the same attention: 3x fewer keys and values saved for backward).
    """
    configs = list({id(cfg): cfg for root in modules for mod in root.modules()  # attention shares its model's config
                    if isinstance(cfg := getattr(mod, "config", None), PretrainedConfig)
                    and cfg._attn_implementation == "sdpa"}.values())
    if configs:
        _register_fp32_sdpa()
    for cfg in configs:
        cfg._attn_implementation = FP32_SDPA
    try:
        yield len(configs)
    finally:
        for cfg in configs:
            cfg._attn_implementation = "sdpa"
