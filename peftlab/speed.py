"""Fast by default on a CPU: glibc's allocator kept from returning memory every step, and bf16
autocast where the processor has bf16 instructions (fp32 stays available, and is the reference
for correctness)."""

import contextlib
import ctypes
import functools
import os
import platform
from typing import Literal

import torch

from peftlab.errors import PeftlabError

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")

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
