"""The `mbconv` search space of `wpk-nas`: MobileNetV2/EfficientNet-style networks.

A network is a stem (3x3 convolution, stride 2), seven stages of inverted residual blocks
(1x1 expansion, KxK depthwise, 1x1 projection; a skip where shapes allow), a 1x1 head, global
pooling and a classifier. An `Architecture` chooses, within MobileNetV2's stage layout:

- a width multiplier (0.5, 0.75, 1.0) on every stage's channels;
- each stage's depth (1 up to MobileNetV2's count);
- each block's depthwise kernel (3, 5, 7) and expansion ratio (1, 3, 6).

Blocks are chosen one by one, so the blocks a plan puts on the device can be of another
kind than those on the edge: the search keeps what each tier's latency table says is cheap
there. `mobilenet_v2(width)` is the fixed reference network of the same space.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from wpk.examples import ModelBuilder

# MobileNetV2: (expansion, channels, depth, first stride) per stage
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
WIDTHS = (0.5, 0.75, 1.0)
KERNELS = (3, 5, 7)
EXPANSIONS = (1, 3, 6)
MAX_BLOCKS = sum(depth for _, _, depth, _ in STAGES)
STEM, HEAD = 32, 1280


def _channels(c: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, as MobileNet does (never below 90 %)."""
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


@dataclass(frozen=True)
class Architecture:
    """One network of the space: indices into WIDTHS, depths, KERNELS, EXPANSIONS."""

    width: int
    depths: tuple[int, ...]                  # per stage
    kernels: tuple[int, ...]                 # per block slot (MAX_BLOCKS), unused beyond depth
    expansions: tuple[int, ...]

    @classmethod
    def from_genes(cls, genes: list[int]) -> "Architecture":
        """The search's flat integer genome: width, depths, kernels, expansions."""
        n = len(STAGES)
        return cls(genes[0], tuple(genes[1:1 + n]), tuple(genes[1 + n:1 + n + MAX_BLOCKS]),
                   tuple(genes[1 + n + MAX_BLOCKS:]))

    def genes(self) -> list[int]:
        return [self.width, *self.depths, *self.kernels, *self.expansions]

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(kernel, expansion, channels, stride) of every block used, in order."""
        found, slot = [], 0
        scale = WIDTHS[self.width]
        for (_, channels, max_depth, stride), depth in zip(STAGES, self.depths):
            for i in range(max_depth):
                if i < depth:
                    found.append((KERNELS[self.kernels[slot]],
                                  EXPANSIONS[self.expansions[slot]],
                                  _channels(channels * scale), stride if i == 0 else 1))
                slot += 1
        return found

    def describe(self) -> str:
        """`w0.75 d1-2-3-4-3-3-1 k3e1 k5e6 ...`: readable in tables and file names."""
        blocks = " ".join(f"k{k}e{e}" for k, e, _, _ in self.blocks())
        return f"w{WIDTHS[self.width]:g} d{'-'.join(map(str, self.depths))} {blocks}"


def gene_ranges() -> list[tuple[int, int]]:
    """Inclusive (low, high) of every gene of the genome."""
    return ([(0, len(WIDTHS) - 1)] + [(1, depth) for _, _, depth, _ in STAGES]
            + [(0, len(KERNELS) - 1)] * MAX_BLOCKS + [(0, len(EXPANSIONS) - 1)] * MAX_BLOCKS)


def mobilenet_v2(width: float = 1.0) -> Architecture:
    """MobileNetV2 itself: kernel 3 everywhere, its expansions and depths."""
    expansions = [EXPANSIONS.index(e) for e, _, depth, _ in STAGES for _ in range(depth)]
    return Architecture(WIDTHS.index(width), tuple(d for _, _, d, _ in STAGES),
                        (0,) * MAX_BLOCKS, tuple(expansions))


def build(arch: Architecture, image_size: int = 224, classes: int = 1000, batch: int = 1,
          seed: int = 0, name: str = "nas") -> onnx.ModelProto:
    """The network as an ONNX model (untrained: He-initialized weights, seeded)."""
    b = ModelBuilder(name, seed=seed)
    x = b.input("image", [batch, 3, image_size, image_size])
    channels = _channels(STEM * WIDTHS[arch.width])
    x = b.conv(x, 3, channels, 3, stride=2)
    for kernel, expansion, out, stride in arch.blocks():
        hidden = channels * expansion
        y = b.conv(x, channels, hidden, 1) if expansion != 1 else x
        y = b.conv(y, hidden, hidden, kernel, stride=stride, group=hidden)
        y = b.conv(y, hidden, out, 1, relu=False)
        x = b.node("Add", [x, y]) if stride == 1 and out == channels else y
        channels = out
    head = max(HEAD, _channels(HEAD * WIDTHS[arch.width]))
    x = b.conv(x, channels, head, 1)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.build([b.gemm(x, head, classes)])


def parameters(arch: Architecture, classes: int = 1000) -> int:
    """Weights in the network (a quick size, without building it)."""
    channels = _channels(STEM * WIDTHS[arch.width])
    total = 27 * channels
    for kernel, expansion, out, _ in arch.blocks():
        hidden = channels * expansion
        total += (channels * hidden if expansion != 1 else 0) + hidden * kernel ** 2 \
            + hidden * out
        channels = out
    head = max(HEAD, _channels(HEAD * WIDTHS[arch.width]))
    return total + channels * head + head * classes
