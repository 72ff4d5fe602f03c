"""Quick facts about the machine that decide how to run."""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device: str = "cpu") -> bool:
    """Whether a bfloat16 matmul beats float32 here (about 0.1 s to find out, once per process).

    CPUs with AMX or AVX512-BF16 run bf16 several times faster than fp32; CPUs without them run it
    several times slower (measured: 49 vs 219 GFLOP/s on an AVX512 Xeon without BF16 support).
    """
    if device != "cpu":
        return torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()

    def seconds(dtype) -> float:
        a = torch.randn(512, 512, dtype=dtype)
        a @ a  # warm-up
        t = time.perf_counter()
        for _ in range(8):
            a @ a
        return time.perf_counter() - t

    return seconds(torch.bfloat16) < 0.8 * seconds(torch.float32)


def loader_workers(num_workers, device) -> int:
    """Image-loading worker processes: as asked, else none on a CPU (the workers would take the cores the
    encoders use) and on a GPU the cores less one, at most 8 (decoding and augmenting keep a GPU waiting)."""
    import os

    if num_workers is not None:
        return int(num_workers)
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def check_precision(precision: str, device: str) -> None:
    """fp16 only where float16 has fast kernels (a GPU): on a CPU it is real float16 arithmetic, about 100x slower
    than float32 on CPUs without float16 matrix units, and no more exact than bf16."""
    from ..errors import VlpromptError

    if precision == "fp16" and torch.device(device).type == "cpu":
        raise VlpromptError("precision fp16 runs on a GPU (--device cuda): float16 on a CPU is about 100x slower "
                            "than float32; use bf16 or auto here")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """'auto' becomes bf16 where it is faster, fp32 otherwise; other values pass through."""
    if precision == "auto":
        return "bf16" if bf16_is_faster(device) else "fp32"
    return precision
