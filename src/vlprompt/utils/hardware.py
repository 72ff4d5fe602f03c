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


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """'auto' becomes bf16 where it is faster, fp32 otherwise; other values pass through."""
    if precision == "auto":
        return "bf16" if bf16_is_faster(device) else "fp32"
    return precision
