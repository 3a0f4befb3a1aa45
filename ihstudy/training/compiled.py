"""torch.compile for the hot loops of a long training run, with a fallback to plain PyTorch.

Compiled, the small ops of a step run as a few fused C++ kernels: ~2x faster unclamped steps
and ~1.6x faster clamped ones on a 2-core CPU, for most of a minute of compilation the first time
a machine meets a pack shape (a few seconds once PyTorch's on-disk cache holds it; measured in
docs/performance.md). Results equal the plain
functions' up to float rounding, and a run always takes the same path (train.compile is part of
its config), so runs stay exactly reproducible and resumable. Inductor's C++ wrapper calls the
kernels of a graph from C++ rather than from generated Python: the same kernels (bit-identical
results) for ~10% less time per 512-d step. And Inductor is told the vector instruction sets the
CPU reports are usable (`cpp.vec_isa_ok`): otherwise every process checks each of them by
compiling a test library and loading it in a child Python, 1.5 s per process on an AVX-512 machine;
its sub-feature checks (bf16, AMX) still run. Where those checks would pass, the kernels are the
same (byte-identical tables); where a kernel then fails to compile, Compiled falls back as below
(docs/performance.md). And AOTAutograd's on-disk cache is told to keep graphs holding a custom
autograd.Function (PlainLoopMatmul): it does not by default, so every process would redo
AOTAutograd's work for its training step, 2-4 s. Its cache key covers the Function's traced forward
and backward (a changed backward misses the cache: docs/performance.md). On AVX-512 CPUs the kernels
use 256-bit (AVX2) vectors: this model's axes of 5 tokens and 8 head dimensions fill a third or half of
AVX-512's 16 float lanes, and a clamped pack's step was 7-15% faster with 8 on an AMD Zen 4
(docs/performance.md).
"""

from __future__ import annotations

import logging

import torch
from torch._functorch import config as functorch_config

from ihstudy.run_files import first_line

log = logging.getLogger(__name__)
MIN_STEPS = 10_000  # train.compile=auto: shorter runs (tests, quick trials) would mostly wait for the compiler
VECTOR_BITS = 256  # Inductor's vector width on CPUs with wider vectors (AVX-512)


def use_compile(setting, n_steps: int, device: torch.device) -> bool:
    """train.compile: true, false, or auto (CPU runs of at least MIN_STEPS steps)."""
    if setting == "auto":
        return device.type == "cpu" and n_steps >= MIN_STEPS
    return bool(setting)


def vector_width() -> dict:
    """Inductor's `cpp.simdlen` option capping its vectors at VECTOR_BITS where ATen found AVX-512
    (elsewhere Inductor's own choice, already at most 256 bits on x86)."""
    return {"cpp.simdlen": VECTOR_BITS} if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


class Compiled:
    """`function` compiled on first call; if compilation fails (e.g. no C++ compiler), the function itself."""

    def __init__(self, function, fullgraph: bool = False):
        self.plain, self.compiled = function, True
        if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # absent from older torch
            functorch_config.autograd_cache_allow_custom_autograd_functions = True
        self.function = torch.compile(function, dynamic=False, fullgraph=fullgraph,
                                      options={"cpp_wrapper": True, "cpp.vec_isa_ok": True, **vector_width()})

    def __call__(self, *args):
        if self.compiled:
            try:
                return self.function(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the same maths, uncompiled
                log.warning("torch.compile failed (%s); continuing without it", first_line(exc))
                self.compiled, self.function = False, self.plain
        return self.function(*args)
