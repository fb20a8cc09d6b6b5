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
    if loop.name in schedule.unrolled:
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
    op = "+=" if c.combine == "sum" else None
    lets = "".join(f"const int {name} = {expr}; " for name, expr in c.lets)

    def update(target: str) -> str:
        # a plain compare vectorizes; fmaxf without -ffast-math is a libm call per element
        step = f"{target} += ({c.term});" if op else \
            f"{{ const float t_ = ({c.term}); {target} = t_ > {target} ? t_ : {target}; }}"
        return f"if ({c.guard}) {step}" if c.guard else step

    lines = ["#include <math.h>", "#include <float.h>", "#include <stdlib.h>",
             f"void {c.name}({params}) {{"]
    threads = schedule.threads
    pad_loop: list[str] = []
    if c.padding is not None:
        p = c.padding
        n, ch, h, w = p.shape
        hp, wp = h + p.pads[0] + p.pads[2], w + p.pads[1] + p.pads[3]
        lines.append(f"float* __restrict__ {p.target} = (float*)aligned_alloc(64, "
                     f"((sizeof(float) * {n * ch * hp * wp} + 63) / 64) * 64);")
        pad_loop = [
            "#pragma omp for schedule(static)" if threads > 1 else "",
            f"for (int q = 0; q < {n * ch}; ++q) for (int y = 0; y < {hp}; ++y) {{",
            f"const int iy = y - {p.pads[0]};",
            "#pragma omp simd",
            f"for (int x = 0; x < {wp}; ++x) {{ const int ix = x - {p.pads[1]}; "
            f"{p.target}[(q * {hp} + y) * {wp} + x] = ((unsigned)iy < {h}u && "
            f"(unsigned)ix < {w}u) ? {p.source}[(q * {h} + iy) * {w} + ix] : {p.fill}; }}",
            "}"]

    def spatial_nest(body: list[str]) -> list[str]:
        # simple nest over the spatial axes in definition order (init / epilogue passes)
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

    if threads > 1:  # one fork/join per call: every pass below is an `omp for` inside it
        lines += [f"#pragma omp parallel num_threads({threads})", "{"]
    lines += pad_loop
    if not fused:
        lines += spatial_nest([f"{out}[{c.out_index}] = {c.init};"])

    defined: set[str] = set()
    depth_lines: list[str] = []
    for i, loop in enumerate(loops):
        if i == acc_start:
            if fused:
                depth_lines.append(f"float acc = {c.init};")
            else:
                depth_lines.append(f"float acc = {out}[{c.out_index}];")
        if i > acc_start and schedule.vectorized and loops[acc_start - 1].name == \
                schedule.vectorized and loop.extent <= 16 and \
                loop.name not in schedule.unrolled:
            depth_lines.append(f"#pragma GCC unroll {loop.extent}")  # under an outer simd loop
        if loop.name == schedule.vectorized:
            if i >= acc_start:
                clause = "+" if c.combine == "sum" else "max"
                depth_lines.append(f"#pragma omp simd reduction({clause}:acc)")
            else:
                depth_lines.append("#pragma omp simd")
        depth_lines += _loop_header(loop, schedule, extent_of)
        depth_lines += _define_axes(loop, defined, c)
    depth_lines.append(lets + (update("acc") if acc_start < len(loops)
                               else update(f"{out}[{c.out_index}]")))
    for i in reversed(range(len(loops))):
        depth_lines.append("}")
        if i == acc_start:
            if fused:
                if c.epilogue:
                    depth_lines.append(f"{{ float v = acc; {out}[{c.out_index}] = {c.epilogue}; }}")
                else:
                    depth_lines.append(f"{out}[{c.out_index}] = acc;")
            else:
                depth_lines.append(f"{out}[{c.out_index}] = acc;")
    lines += depth_lines
    if not fused and c.epilogue:
        lines += spatial_nest([f"{{ float v = {out}[{c.out_index}]; "
                               f"{out}[{c.out_index}] = {c.epilogue}; }}"])
    if threads > 1:
        lines.append("}")
    if c.padding is not None:
        lines.append(f"free({c.padding.target});")
    lines.append("}")
    return "\n".join(lines) + "\n"
