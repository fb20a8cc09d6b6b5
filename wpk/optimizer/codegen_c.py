"""Lower a (Compute, Schedule) pair to C with OpenMP pragmas.

Shapes are compile-time constants (one kernel per operator shape, like TVM), so gcc folds
every index expression. When all reduce loops are innermost, the reduction runs in a register
and init, reduction and epilogue fuse into one pass; otherwise the output buffer accumulates
(init pass, reduction nest, epilogue pass).
"""
from __future__ import annotations

from wpk.optimizer.dsl import Compute, Loop, Schedule


def _axis_value(loop: Loop) -> str:
    return f"({loop.axis}_o * {loop.factor} + {loop.axis}_i)"


def _loop_header(loop: Loop, schedule: Schedule, extent_of: dict[str, int]) -> list[str]:
    lines = []
    if loop.name == schedule.parallel_loop:
        lines.append("#pragma omp for schedule(guided)")
    if loop.name in schedule.unrolled and loop.name != schedule.vectorized:
        # (an `omp simd` loop takes no unroll pragma: both must directly precede the `for`)
        lines.append(f"#pragma GCC unroll {schedule.unrolled[loop.name]}")
    if loop.part == "inner" and extent_of[loop.axis] % loop.factor:
        bound = f"({loop.factor} < {extent_of[loop.axis]} - {loop.axis}_o * {loop.factor} ? " \
                f"{loop.factor} : {extent_of[loop.axis]} - {loop.axis}_o * {loop.factor})"
    else:
        bound = str(loop.extent)
    lines.append(f"for (int {loop.name} = 0; {loop.name} < {bound}; ++{loop.name}) {{")
    return lines


def _define_axes(loop: Loop, defined: set[str], compute: Compute) -> list[str]:
    """Define an axis variable as soon as the loops that make it are open."""
    if loop.part == "all":
        defined.add(loop.axis)
        return []
    if loop.part == "inner":
        defined.add(loop.axis)
        return [f"const int {loop.axis} = {_axis_value(loop)};"]
    return []


def lower_c(compute: Compute, schedule: Schedule) -> str:
    schedule.validate()
    c = compute
    extent_of = {a.name: a.extent for a in c.axes}
    params = ", ".join(
        (f"const float* __restrict__ {b.name}" if b.role == "in" else f"float* __restrict__ {b.name}")
        for b in c.buffers)
    out = c.output.name
    loops = schedule.loops
    kinds = [l.kind for l in loops]
    # the trailing run of reduce loops can accumulate in a register
    acc_start = len(loops)
    while acc_start > 0 and kinds[acc_start - 1] == "reduce":
        acc_start -= 1
    fused = all(k == "spatial" for k in kinds[:acc_start]) and acc_start < len(loops)
    lets = "".join(f"const int {name} = {expr}; " for name, expr in c.lets)

    def update(target: str) -> str:
        return _update(c, target)

    lines = ["#include <math.h>", "#include <float.h>", "#include <stdlib.h>",
             f"void {c.name}({params}) {{"]
    threads = schedule.threads
    pad_loop: list[str] = []
    if c.padding is not None:
        lines.append(_padding_alloc(c))
        pad_loop = _padding_loop(c, threads)
    if threads > 1:  # one fork/join per call: every pass below is an `omp for` inside it
        lines += [f"#pragma omp parallel num_threads({threads})", "{"]
    lines += pad_loop
    tile = _register_tile(loops)
    if tile is not None:
        lines += _lower_tiled(c, schedule, extent_of, tile, lets, update)
        return _close_function(lines, c, threads)
    if not fused:
        lines += _spatial_nest(c, threads, [f"{out}[{c.out_index}] = {c.init};"])
    lines += _open_reduction(c, schedule, extent_of, acc_start, fused)
    lines.append(lets + (update("acc") if acc_start < len(loops)
                         else update(f"{out}[{c.out_index}]")))
    lines += _close_reduction(c, len(loops), acc_start, fused)
    if not fused and c.epilogue:
        lines += _spatial_nest(c, threads, [f"{{ float v = {out}[{c.out_index}]; "
                                            f"{out}[{c.out_index}] = {c.epilogue}; }}"])
    return _close_function(lines, c, threads)


def _update(c: Compute, target: str) -> str:
    """The statement that combines one term into `target` (sum or max), under the guard."""
    # a plain compare vectorizes; fmaxf without -ffast-math is a libm call per element
    step = f"{target} += ({c.term});" if c.combine == "sum" else \
        f"{{ const float t_ = ({c.term}); {target} = t_ > {target} ? t_ : {target}; }}"
    return f"if ({c.guard}) {step}" if c.guard else step


def _padded_hw(c: Compute) -> tuple[int, int]:
    p = c.padding
    _, _, h, w = p.shape
    return h + p.pads[0] + p.pads[2], w + p.pads[1] + p.pads[3]


def _padding_alloc(c: Compute) -> str:
    """The allocation of the padded copy of the input."""
    p = c.padding
    n, ch, _, _ = p.shape
    hp, wp = _padded_hw(c)
    return (f"float* __restrict__ {p.target} = (float*)aligned_alloc(64, "
            f"((sizeof(float) * {n * ch * hp * wp} + 63) / 64) * 64);")


def _padding_loop(c: Compute, threads: int) -> list[str]:
    """The pass that fills the padded copy (inside the parallel region)."""
    p = c.padding
    n, ch, h, w = p.shape
    hp, wp = _padded_hw(c)
    return [
        "#pragma omp for schedule(static)" if threads > 1 else "",
        f"for (int q = 0; q < {n * ch}; ++q) for (int y = 0; y < {hp}; ++y) {{",
        f"const int iy = y - {p.pads[0]};",
        "#pragma omp simd",
        f"for (int x = 0; x < {wp}; ++x) {{ const int ix = x - {p.pads[1]}; "
        f"{p.target}[(q * {hp} + y) * {wp} + x] = ((unsigned)iy < {h}u && "
        f"(unsigned)ix < {w}u) ? {p.source}[(q * {h} + iy) * {w} + ix] : {p.fill}; }}",
        "}"]


def _spatial_nest(c: Compute, threads: int, body: list[str]) -> list[str]:
    """A simple nest over the spatial axes in definition order (init / epilogue passes)."""
    nest: list[str] = []
    spatial = c.spatial
    for i, axis in enumerate(spatial):
        if i == 0 and threads > 1:
            collapse = " collapse(2)" if len(spatial) > 2 else ""
            nest.append(f"#pragma omp for schedule(static){collapse}")
        if i == len(spatial) - 1:
            nest.append("#pragma omp simd")
        nest.append(f"for (int {axis.name} = 0; {axis.name} < {axis.extent}; "
                    f"++{axis.name}) {{")
    nest += body + ["}"] * len(spatial)
    return nest


def _open_reduction(c: Compute, schedule: Schedule, extent_of: dict[str, int],
                    acc_start: int, fused: bool) -> list[str]:
    """The scheduled loops, opened outermost first, with the accumulator declared where the
    trailing reduce loops begin."""
    loops = schedule.loops
    lines: list[str] = []
    defined: set[str] = set()
    for i, loop in enumerate(loops):
        if i == acc_start:
            if fused:
                lines.append(f"float acc = {c.init};")
            else:
                lines.append(f"float acc = {c.output.name}[{c.out_index}];")
        if i > acc_start and schedule.vectorized and loops[acc_start - 1].name == \
                schedule.vectorized and loop.extent <= 16 and \
                loop.name not in schedule.unrolled:
            lines.append(f"#pragma GCC unroll {loop.extent}")  # under an outer simd loop
        if loop.name == schedule.vectorized:
            if i >= acc_start:
                clause = "+" if c.combine == "sum" else "max"
                lines.append(f"#pragma omp simd reduction({clause}:acc)")
            else:
                lines.append("#pragma omp simd")
        lines += _loop_header(loop, schedule, extent_of)
        lines += _define_axes(loop, defined, c)
    return lines


def _close_reduction(c: Compute, depth: int, acc_start: int, fused: bool) -> list[str]:
    """The `depth` loops closed, innermost first, with the accumulator stored (through the
    epilogue where it is fused) where it was declared."""
    out = c.output.name
    lines: list[str] = []
    for i in reversed(range(depth)):
        lines.append("}")
        if i == acc_start:
            if fused:
                if c.epilogue:
                    lines.append(f"{{ float v = acc; {out}[{c.out_index}] = {c.epilogue}; }}")
                else:
                    lines.append(f"{out}[{c.out_index}] = acc;")
            else:
                lines.append(f"{out}[{c.out_index}] = acc;")
    return lines


def _close_function(lines: list[str], c, threads: int) -> str:
    """End the parallel region, free the padded copy, close the function: the C source."""
    if threads > 1:
        lines.append("}")
    if c.padding is not None:
        lines.append(f"free({c.padding.target});")
    lines.append("}")
    return "\n".join(lines) + "\n"


MAX_TILE = 256  # accumulators of one register tile (floats)


def _register_tile(loops: list[Loop]) -> int | None:
    """Index of the first tile loop when the nest reads spatial* reduce+ spatial+ and the
    trailing spatial loops are small enough to keep their accumulators in registers."""
    kinds = [l.kind for l in loops]
    if "reduce" not in kinds:
        return None
    first_reduce = kinds.index("reduce")
    if any(k != "spatial" for k in kinds[:first_reduce]):
        return None
    tail = kinds[first_reduce:]
    if "spatial" not in tail:
        return None
    start = first_reduce + tail.index("spatial")
    if any(k != "spatial" for k in kinds[start:]):
        return None
    size = 1
    for loop in loops[start:]:
        size *= loop.extent
    return start if size <= MAX_TILE else None


def _lower_tiled(c: Compute, schedule: Schedule, extent_of: dict[str, int], start: int,
                 lets: str, update) -> list[str]:
    """Register blocking: a local accumulator tile over the innermost spatial loops, filled
    by the reduction and stored once (with the epilogue) when it is done."""
    loops = schedule.loops
    outer, reduce, tile = loops[:loops.index(next(l for l in loops if l.kind == "reduce"))], \
        [l for l in loops if l.kind == "reduce"], loops[start:]
    dims = "".join(f"[{l.extent}]" for l in tile)
    index = "".join(f"[{l.name}]" for l in tile)
    defined: set[str] = set()

    def open_loops(group: list[Loop], vector_ok: bool) -> list[str]:
        out: list[str] = []
        for loop in group:
            if vector_ok and loop.name == schedule.vectorized:
                out.append("#pragma omp simd")
            out += _loop_header(loop, schedule, extent_of)
            out += _define_axes(loop, defined, c)
        return out

    lines = open_loops(outer, False)
    lines.append(f"float acc{dims};")
    lines += open_loops(tile, True) + [f"acc{index} = {c.init};"] + ["}"] * len(tile)
    lines += open_loops(reduce, False) + open_loops(tile, True)
    lines.append(lets + update(f"acc{index}"))
    lines += ["}"] * (len(tile) + len(reduce))
    store = f"{c.output.name}[{c.out_index}]"
    body = f"{{ float v = acc{index}; {store} = {c.epilogue}; }}" if c.epilogue \
        else f"{store} = acc{index};"
    lines += open_loops(tile, True) + [body] + ["}"] * len(tile)
    lines += ["}"] * len(outer)
    return lines
