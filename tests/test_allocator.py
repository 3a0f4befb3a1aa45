"""allocator.keep_freed_memory: a step's freed tensors come back without the kernel's page faults."""

import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from ihstudy.training.allocator import keep_freed_memory
    keep_freed_memory()

def step():  # eight 16 MB tensors, as a Markov pack's attention tensors, made and freed
    tensors = [torch.ones(4 * 2**20) for _ in range(8)]
    del tensors

step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_OF_ONE_TENSOR = 16 * 2**20 // 4096


def page_faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout)


def test_freed_memory_is_reused_without_page_faults():
    default = max(page_faults("default") for _ in range(3))  # glibc's own reuse varies from process to process
    kept = page_faults("keep")
    if default < 2 * PAGES_OF_ONE_TENSOR:
        pytest.skip(f"this C library reuses the memory by itself ({default} page faults in 10 steps)")
    assert kept < default / 4, (kept, default)
