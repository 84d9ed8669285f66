"""The three shape sets of the benchmark (see benchmarks/README.md).

Written out in code so that no model library is needed: GPT-2 small as in Hugging
Face's ``GPT2LMHeadModel`` (tied embeddings counted once), ResNet-50 in torchvision's
layout (``named_parameters`` order), and 2000 vectors of 256.
"""

from __future__ import annotations

import math

__all__ = ["SETS", "gpt2_small", "many_small", "numel", "resnet50"]

Shape = tuple[int, ...]


def gpt2_small() -> list[Shape]:
    """148 tensors, 124.4 M elements."""
    d, vocab, ctx = 768, 50257, 1024
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,)]
    block += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d), *block * 12, (d,), (d,)]


def resnet50() -> list[Shape]:
    """161 tensors, 25.56 M elements: conv weights, two batch-norm vectors per conv."""

    def conv_bn(out: int, inp: int, k: int) -> list[Shape]:
        return [(out, inp, k, k), (out,), (out,)]

    shapes = conv_bn(64, 3, 7)
    inp = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += conv_bn(width, inp, 1) + conv_bn(width, width, 3)
            shapes += conv_bn(4 * width, width, 1)
            if b == 0:  # the downsample branch
                shapes += conv_bn(4 * width, inp, 1)
            inp = 4 * width
    return [*shapes, (1000, 2048), (1000,)]


def many_small(n: int = 2000, size: int = 256) -> list[Shape]:
    """``n`` vectors of ``size``: where per-tensor overhead dominates."""
    return [(size,)] * n


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


SETS = {"gpt2-small": gpt2_small, "resnet-50": resnet50, "2000x256": many_small}
