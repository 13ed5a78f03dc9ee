"""Machine description, allocator detection and the matmul peak."""

import pytest

from vitlab.bench import allocator_setting, describe_machine, matmul_peak_gflops


def test_describe_machine_has_the_facts_tables_need():
    info = describe_machine()
    for key in ("cpu", "cores", "torch_threads", "allocator", "cuda", "torch", "timm", "vitlab"):
        assert key in info
    assert info["cores"] >= 1
    assert info["torch_threads"] >= 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "glibc default"),
        ({"MALLOC_MMAP_THRESHOLD_": "4294967296"}, "glibc tuned (mmap 4 GiB)"),
        (
            {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"},
            "glibc tuned (mmap 4 GiB, trim 16 GiB)",
        ),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc"),
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4", "MALLOC_MMAP_THRESHOLD_": "1"}, "tcmalloc"),
    ],
)
def test_allocator_setting(env, expected):
    assert allocator_setting(env) == expected


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(n=128, repeats=2) > 0
