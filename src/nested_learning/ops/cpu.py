"""Which CPU this is, as far as PyTorch's CPU libraries care.

PyTorch's fp32 products and triangular solves on x86 call MKL, which takes its own fast code paths on Intel CPUs and a
generic one on other vendors' (on an AMD EPYC machine a 1024 x 1024 product ran at ~105 GFLOP/s a core against ~235
through oneDNN, and a batched 64 x 64 triangular solve at half the speed of this package's blocked inverse; on an
Intel Xeon MKL's product was the faster of the two and its solve 2.6x faster than the blocked inverse). Where a
choice between kernels depends on that, it asks :func:`mkl_generic_path`; where a working set should fit a cache,
:func:`l2_cache_bytes`; whether compiled graphs take inductor's C++ wrapper, :func:`cpp_wrapper_default`.
"""

from __future__ import annotations

import glob
import os
import platform

import torch

X86 = ("x86_64", "amd64", "x86", "i386", "i686")


def _cpuinfo_field(name: str) -> str | None:
    """The first CPU's ``name`` field in Linux' /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str | None:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or None where it cannot be read."""
    vendor = _cpuinfo_field("vendor_id")
    if vendor is not None:
        return vendor
    # Windows names the vendor at the end of the processor string ("AMD64 Family 25 ..., AuthenticAMD")
    last = platform.processor().replace(",", " ").split()
    return last[-1] if last and last[-1] in ("GenuineIntel", "AuthenticAMD", "HygonGenuine") else None


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string, for reports."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def mkl_on_another_vendors_x86(machine: str, vendor: str | None, has_mkl: bool) -> bool:
    """Whether PyTorch's CPU library is MKL on an x86 CPU known not to be Intel's (where MKL takes its generic
    path). An unknown vendor counts as Intel's: the library's own kernels are then kept."""
    return has_mkl and machine.lower() in X86 and vendor is not None and vendor != "GenuineIntel"


_MKL_GENERIC_PATH = mkl_on_another_vendors_x86(platform.machine(), cpu_vendor(), torch.backends.mkl.is_available())


def mkl_generic_path() -> bool:
    """:func:`mkl_on_another_vendors_x86` for this machine and this PyTorch (read at import, so that compiled code
    can ask too)."""
    return _MKL_GENERIC_PATH


def _cache_size_bytes(text: str) -> int | None:
    """``"2048K"``, ``"1M"``, ``"512"`` (sysfs' cache sizes) in bytes, or None."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


def l2_cache_bytes_in(cache_dir: str) -> int | None:
    """The size of the level-2 data (or unified) cache listed under ``cache_dir`` (Linux sysfs' ``.../cpu0/cache``:
    one ``index*`` folder per cache with ``level``, ``type`` and ``size``), or None."""
    for index in sorted(glob.glob(os.path.join(cache_dir, "index*"))):
        try:
            with open(os.path.join(index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = _cache_size_bytes(f.read())
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data") and size:
            return size
    return None


_L2_CACHE_BYTES = l2_cache_bytes_in("/sys/devices/system/cpu/cpu0/cache")


def l2_cache_bytes() -> int | None:
    """One core's L2 cache in bytes (Linux; the first CPU's), or None where it cannot be read (read at import)."""
    return _L2_CACHE_BYTES


def cpp_wrapper_pays(vendor: str | None) -> bool:
    """Whether compiled layer graphs (``memory/compiled_steps.py``) take inductor's C++ wrapper on a CPU of
    ``vendor`` (``lscpu``'s vendor id). The Python wrapper makes a few hundred calls per 16-token segment's layer
    call, at about 3.5 us each on an Intel Xeon, where HOPE tiny's compiled training step ran 1.04-1.06x faster with
    the C++ wrapper (2 threads passive, 1 thread; T = 512, alternating in one process). On an AMD EPYC, whose small
    calls cost about 1.3 us, it ran 0.91x (separate processes; its small chunk inverses were still LAPACK solves,
    which the C++ wrapper reaches through a slower fallback). Other CPUs are unmeasured."""
    return vendor == "GenuineIntel"


_CPP_WRAPPER = cpp_wrapper_pays(cpu_vendor())


def cpp_wrapper_default() -> bool:
    """:func:`cpp_wrapper_pays` for this machine (read at import)."""
    return _CPP_WRAPPER
