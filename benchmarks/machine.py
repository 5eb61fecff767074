"""The machine's speed, printed beside absolute figures (machines here differ up to 10x for the same code)."""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul speed with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
