"""Measuring a run: peak memory while it runs, and the facts of the machine it ran on."""

import ctypes
import functools
import math
import os
import platform
import threading
from importlib.metadata import PackageNotFoundError, version

import torch

from peftlab.speed import release_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _mallinfo2():
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return f


def live_heap_bytes() -> int | None:
    """Bytes in live malloc allocations, all arenas (glibc's mallinfo2; None elsewhere): on the
    CPU, the memory tensors hold. RSS also counts the free heap that `speed.tune_allocator` keeps
    resident, which moves by up to its 256 MiB top pad between identical runs as allocations land."""
    f = _mallinfo2()
    if f is None:
        return None
    info = f()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Context manager: the peak memory inside the block, and its rise over the start, in MiB.

    On CPU, a sampler thread reads the process RSS every `interval` seconds (ru_maxrss only
    ever grows, so it cannot measure one run among several in a process), and with `live` (glibc)
    the live heap too (`live_mb`: what the tensors held at most, without the allocator's kept
    free space; each read walks the free chunks under the heap's lock, 0.2 ms to several ms
    as the heap fragments, hence opt-in). On CUDA, the allocator's
    own peak counter, for both.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.02, live: bool = False):
        self.device, self.interval, self.peak_mb, self.rise_mb = device, interval, 0.0, 0.0
        self.live = live
        self.live_mb: float | None = None
        self._live: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        release_memory()  # the tuned allocator keeps freed memory: a run after another would count it
        self._peak = self._start = rss_bytes()
        self._live = live_heap_bytes() if self.live else None
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())
            if self._live is not None:
                self._live = max(self._live, live_heap_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else max(self._peak, rss_bytes())
        self.peak_mb = peak / 2**20
        if self.live and self.device.startswith("cuda"):
            self.live_mb = self.peak_mb
        elif self._live is not None:
            self.live_mb = max(self._live, live_heap_bytes() or 0) / 2**20
        # what the block added on top of what was resident when it began
        self.rise_mb = (peak - (0 if self.device.startswith("cuda") else self._start)) / 2**20


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("peftlab", "torch", "transformers", "datasets", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def describe_machine(m: dict) -> str:
    """A machine() record as one line: 'AMD EPYC 7B13 (x86_64), 2 CPUs, 2 torch threads, Linux-...'."""
    cpu = f"{m['cpu_model']} ({m.get('processor')})" if m.get("cpu_model") else m.get("processor")
    parts = [m.get("cuda"), cpu, m.get("cpus") and f"{m['cpus']} CPUs",
             m.get("torch_threads") and f"{m['torch_threads']} torch threads", m.get("platform")]
    return ", ".join(str(x) for x in parts if x) or "not recorded"


def count_params(model: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names), sum(p.numel() for p in params.values())


def fmt_seconds(s: float | None) -> str:
    if s is None or math.isnan(s):  # nothing trained (in-context cells): no epochs to time
        return "-"
    return f"{s:.1f}" if s >= 1 else f"{s:.2g}"  # an epoch on cached features takes milliseconds


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)
