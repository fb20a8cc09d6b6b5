"""The kernel DSL: compute definitions plus schedules, independent of the target.

A `Compute` says *what* an operator computes: spatial axes (one output element each),
reduce axes (combined with + or max), the term for one point of the iteration space written as
a C expression over the axis names, a guard (padding), an initial value and an epilogue.
A `Schedule` says *how* to loop over it: `split` (tile) an axis by a factor, `reorder` loops,
`vectorize` the innermost loop (or the innermost spatial loop when only reduce loops run
inside it: outer-loop vectorization with the small reduction unrolled), `unroll` a loop, `parallel` the outermost loop over threads.
`codegen_c` and `codegen_cuda` lower the pair to source code. The compute definitions of
Conv2d (grouped, depthwise, strided, padded, dilated), Gemm/MatMul and pooling live in
`wpk.optimizer.ops`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Axis:
    name: str
    extent: int
    kind: Literal["spatial", "reduce"]


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    role: Literal["in", "out"]

    @property
    def size(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count


@dataclass(frozen=True)
class Padding:
    """A padded copy of an input, made by the kernel before the main nest (a compute stage of
    its own, as in TVM): the hot loops then need no bounds checks."""

    source: str                      # input buffer name
    target: str                      # name the term reads
    shape: tuple[int, int, int, int]  # NCHW of the source
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    fill: str = "0.0f"


@dataclass
class Compute:
    """out[out_index] = epilogue(combine(init, term over the reduce axes where guard))."""

    name: str
    axes: list[Axis]
    buffers: list[Buffer]            # parameter order of the generated function
    out_index: str                   # flat index into the output, spatial axes only
    term: str                        # value of one reduction point (all axes)
    init: str = "0.0f"               # spatial axes only
    guard: str | None = None         # reduction point counts only where true (padding)
    combine: Literal["sum", "max"] = "sum"
    epilogue: str | None = None      # expression of `v` (and spatial axes), e.g. relu
    lets: list[tuple[str, str]] = field(default_factory=list)  # int helpers: (name, expr)
    padding: Padding | None = None
    flops: float = 0.0

    @property
    def spatial(self) -> list[Axis]:
        return [a for a in self.axes if a.kind == "spatial"]

    @property
    def reduce(self) -> list[Axis]:
        return [a for a in self.axes if a.kind == "reduce"]

    @property
    def output(self) -> Buffer:
        return next(b for b in self.buffers if b.role == "out")

    def axis(self, name: str) -> Axis:
        return next(a for a in self.axes if a.name == name)


@dataclass(frozen=True)
class Loop:
    """One loop of a lowered nest: either a whole axis or one part of a split axis."""

    name: str
    axis: str
    extent: int                      # trip count (outer: ceil(extent / factor))
    kind: Literal["spatial", "reduce"]
    part: Literal["all", "outer", "inner"] = "all"
    factor: int = 1


class ScheduleError(ValueError):
    """A schedule that cannot be lowered correctly (e.g. a reduce loop run in parallel)."""


class Schedule:
    """Schedule primitives over a `Compute`; the loop order starts as the axes' order."""

    def __init__(self, compute: Compute):
        self.compute = compute
        self.loops: list[Loop] = [Loop(a.name, a.name, a.extent, a.kind) for a in compute.axes]
        self.vectorized: str | None = None
        self.unrolled: dict[str, int] = {}
        self.parallel_loop: str | None = None
        self.threads: int = 1

    # -- primitives ------------------------------------------------------------------------
    def split(self, axis: str, factor: int) -> tuple[str, str]:
        """Tile `axis` into `axis_o` (outer) and `axis_i` (inner, `factor` iterations)."""
        index = next((i for i, l in enumerate(self.loops) if l.name == axis), None)
        if index is None:
            raise ScheduleError(f"no loop {axis!r} to split")
        loop = self.loops[index]
        if factor <= 1 or factor >= loop.extent:
            return axis, axis
        outer = Loop(f"{axis}_o", axis, -(-loop.extent // factor), loop.kind, "outer", factor)
        inner = Loop(f"{axis}_i", axis, factor, loop.kind, "inner", factor)
        self.loops[index:index + 1] = [outer, inner]
        return outer.name, inner.name

    def reorder(self, *names: str) -> None:
        """Put the named loops in this order, in the positions they occupy now."""
        positions = sorted(i for i, l in enumerate(self.loops) if l.name in names)
        if len(positions) != len(names):
            raise ScheduleError(f"reorder names unknown loops: {names}")
        by_name = {l.name: l for l in self.loops}
        for pos, name in zip(positions, names):
            self.loops[pos] = by_name[name]

    def vectorize(self, name: str) -> None:
        self.vectorized = name

    def unroll(self, name: str, factor: int) -> None:
        if factor > 1:
            self.unrolled[name] = factor

    def parallel(self, name: str, threads: int) -> None:
        self.parallel_loop, self.threads = name, max(1, threads)

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        names = [l.name for l in self.loops]
        for loop in self.loops:
            if loop.part == "inner" and names.index(f"{loop.axis}_o") > names.index(loop.name):
                raise ScheduleError(f"{loop.name} runs outside {loop.axis}_o")
        if self.parallel_loop is not None:
            if names[0] != self.parallel_loop:
                raise ScheduleError("only the outermost loop can run in parallel")
            if self.loops[0].kind != "spatial":
                raise ScheduleError("a reduce loop cannot run in parallel (threads would race)")
        if self.vectorized is not None and names[-1] != self.vectorized:
            index = names.index(self.vectorized)
            if self.loops[index].kind != "spatial" or \
                    any(l.kind != "reduce" for l in self.loops[index + 1:]):
                raise ScheduleError("only the innermost loop, or the innermost spatial loop "
                                    "with only reduce loops inside, can be vectorized")

    def describe(self) -> str:
        parts = []
        for loop in self.loops:
            tags = []
            if loop.name == self.parallel_loop:
                tags.append(f"parallel({self.threads})")
            if loop.name == self.vectorized:
                tags.append("vec")
            if loop.name in self.unrolled:
                tags.append(f"unroll{self.unrolled[loop.name]}")
            parts.append(loop.name + (f"[{','.join(tags)}]" if tags else ""))
        return " > ".join(parts)
