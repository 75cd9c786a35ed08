"""Float32 evaluation means float32: TF32 off for matmuls and cuDNN convolutions unless asked.

PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) by default on Ampere and later GPUs,
so a "float32" evaluation there silently computes its convolutions in reduced precision. The eval
command lines (eval.pgd, eval.autoattack) run inside `evaluation_precision`, which turns TF32 off
for both unless --allow-tf32 is given, and record the setting in force as "tf32" in their JSON.
The flags are process-wide; they are restored on exit, so a caller's own setting survives.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch


def add_tf32_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-tf32", action="store_true",
                        help="let matmuls and cuDNN convolutions use TF32 on Ampere+ GPUs "
                        "(faster, ~1e-3 relative error; default: off, true float32)")


def tf32_enabled() -> bool:
    """Whether matmuls or cuDNN convolutions may use TF32 now (the flags are readable on CPU)."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def evaluation_precision(allow_tf32: bool = False) -> Iterator[None]:
    """TF32 for matmuls and cuDNN set to `allow_tf32` inside the block, the previous flags after."""
    # The two allow_tf32 flags only: torch refuses to read the matmul precision once these and
    # its newer fp32_precision settings have both been written in one process.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
