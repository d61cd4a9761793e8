"""What the package reads about the CPU (``ops/cpu.py``): the cache size the chunk groups are sized by and which
CPUs take MKL's generic path."""

import pytest

from nested_learning.ops import cpu


def _cache(root, index, level, kind, size):
    folder = root / f"index{index}"
    folder.mkdir()
    for name, value in (("level", level), ("type", kind), ("size", size)):
        (folder / name).write_text(f"{value}\n")


def test_the_l2_cache_is_read_from_the_listed_caches(tmp_path):
    _cache(tmp_path, 0, 1, "Data", "48K")
    _cache(tmp_path, 1, 1, "Instruction", "64K")
    _cache(tmp_path, 2, 2, "Unified", "2048K")
    _cache(tmp_path, 3, 3, "Unified", "491520K")
    assert cpu.l2_cache_bytes_in(str(tmp_path)) == 2 * 2**20


def test_no_l2_cache_listed_reads_as_none(tmp_path):
    assert cpu.l2_cache_bytes_in(str(tmp_path)) is None
    _cache(tmp_path, 0, 1, "Data", "32K")
    _cache(tmp_path, 1, 2, "Unified", "oops")
    assert cpu.l2_cache_bytes_in(str(tmp_path)) is None


def test_cache_sizes_in_every_unit():
    assert cpu._cache_size_bytes("1M") == 2**20
    assert cpu._cache_size_bytes("512K\n") == 512 * 1024
    assert cpu._cache_size_bytes("4096") == 4096
    assert cpu._cache_size_bytes("") is None and cpu._cache_size_bytes("0K") is None


def test_this_machine_reads_a_plausible_l2_cache_or_none():
    size = cpu.l2_cache_bytes()
    assert size is None or 64 * 1024 <= size <= 64 * 2**20


@pytest.mark.parametrize(
    "machine, vendor, has_mkl, expected",
    [
        ("x86_64", "AuthenticAMD", True, True),  # MKL's generic path
        ("AMD64", "AuthenticAMD", True, True),
        ("x86_64", "HygonGenuine", True, True),
        ("x86_64", "GenuineIntel", True, False),  # MKL's own fast path
        ("x86_64", "AuthenticAMD", False, False),  # a PyTorch without MKL: its own library is not MKL's
        ("aarch64", None, True, False),
        ("x86_64", None, True, False),  # unknown vendor: counted as Intel's
    ],
)
def test_mkl_takes_its_generic_path_on_other_vendors_x86_cpus(machine, vendor, has_mkl, expected):
    assert cpu.mkl_on_another_vendors_x86(machine, vendor, has_mkl) is expected


def test_cpu_vendor_and_model_read_this_machine():
    vendor = cpu.cpu_vendor()
    assert vendor is None or (isinstance(vendor, str) and vendor)
    assert isinstance(cpu.cpu_model(), str)
