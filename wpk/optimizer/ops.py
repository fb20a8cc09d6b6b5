"""Compute definitions of the heavy operators and the schedule space each one is tuned in.

Each builder returns a `Compute` for one concrete shape. `schedule_space(compute)` gives the
knobs a search strategy explores; `make_schedule(compute, config)` applies the schedule
primitives those knobs stand for.
"""
from __future__ import annotations

import os
import numpy as np

from wpk.optimizer.dsl import Axis, Buffer, Compute, Padding, Schedule, ScheduleError
from wpk.optimizer.space import Config, Knob, Space

RELU = "(v > 0.0f ? v : 0.0f)"


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                     dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(n: int, c: int, h: int, w: int, m: int, kh: int, kw: int, stride=(1, 1),
           pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, bias: bool = True,
           relu: bool = False, name: str = "conv2d") -> Compute:
    """NCHW Conv2d; pads = (top, left, bottom, right) as in ONNX; weights (M, C/group, kh, kw)."""
    if c % group or m % group:
        raise ValueError(f"channels {c}->{m} not divisible by group {group}")
    sh, sw = stride
    dh, dw = dilations
    oh = conv_output_size(h, kh, sh, pads[0], pads[2], dh)
    ow = conv_output_size(w, kw, sw, pads[1], pads[3], dw)
    cg, mg = c // group, m // group
    buffers = [Buffer("X", (n, c, h, w), "in"), Buffer("Wt", (m, cg, kh, kw), "in")]
    if bias:
        buffers.append(Buffer("B", (m,), "in"))
    buffers.append(Buffer("Y", (n, m, oh, ow), "out"))
    in_channel = f"(oc / {mg}) * {cg} + ic" if group > 1 else "ic"
    padded = any(pads)
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    src = "Xp" if padded else "X"
    return Compute(
        name=name,
        axes=[Axis("b", n, "spatial"), Axis("oc", m, "spatial"), Axis("oh", oh, "spatial"),
              Axis("ow", ow, "spatial"), Axis("ic", cg, "reduce"), Axis("r", kh, "reduce"),
              Axis("s", kw, "reduce")],
        buffers=buffers,
        out_index=f"((b * {m} + oc) * {oh} + oh) * {ow} + ow",
        lets=[("ih", f"oh * {sh} + r * {dh}"), ("iw", f"ow * {sw} + s * {dw}")],
        term=f"{src}[((b * {c} + {in_channel}) * {hp} + ih) * {wp} + iw] * "
             f"Wt[((oc * {cg} + ic) * {kh} + r) * {kw} + s]",
        padding=Padding("X", "Xp", (n, c, h, w), tuple(pads)) if padded else None,
        init="B[oc]" if bias else "0.0f",
        epilogue=RELU if relu else None,
        flops=2.0 * n * m * oh * ow * cg * kh * kw)


def gemm(m: int, n: int, k: int, trans_a: bool = False, trans_b: bool = False,
         alpha: float = 1.0, beta: float = 1.0, bias: str | None = "row",
         relu: bool = False, name: str = "gemm") -> Compute:
    """Y[m, n] = alpha * A @ B + beta * C; bias 'row' = C of shape (n,), 'full' = (m, n)."""
    a = f"A[k * {m} + i]" if trans_a else f"A[i * {k} + k]"
    b = f"Bm[j * {k} + k]" if trans_b else f"Bm[k * {n} + j]"
    buffers = [Buffer("A", (k, m) if trans_a else (m, k), "in"),
               Buffer("Bm", (n, k) if trans_b else (k, n), "in")]
    init = "0.0f"
    if bias == "row":
        buffers.append(Buffer("C", (n,), "in"))
        init = f"{float(beta)!r}f * C[j]"
    elif bias == "full":
        buffers.append(Buffer("C", (m, n), "in"))
        init = f"{float(beta)!r}f * C[i * {n} + j]"
    buffers.append(Buffer("Y", (m, n), "out"))
    term = f"{a} * {b}" if alpha == 1.0 else f"{float(alpha)!r}f * {a} * {b}"
    return Compute(name=name,
                   axes=[Axis("i", m, "spatial"), Axis("j", n, "spatial"), Axis("k", k, "reduce")],
                   buffers=buffers, out_index=f"i * {n} + j", term=term, init=init,
                   epilogue=RELU if relu else None, flops=2.0 * m * n * k)


def pool2d(kind: str, n: int, c: int, h: int, w: int, kh: int, kw: int, stride=(1, 1),
           pads=(0, 0, 0, 0), count_include_pad: bool = False, name: str = "pool2d") -> Compute:
    """MaxPool / AveragePool over NCHW."""
    sh, sw = stride
    oh = conv_output_size(h, kh, sh, pads[0], pads[2], 1)
    ow = conv_output_size(w, kw, sw, pads[1], pads[3], 1)
    padded = any(pads)
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    src = "Xp" if padded else "X"
    compute = Compute(
        name=name,
        axes=[Axis("b", n, "spatial"), Axis("ch", c, "spatial"), Axis("oh", oh, "spatial"),
              Axis("ow", ow, "spatial"), Axis("r", kh, "reduce"), Axis("s", kw, "reduce")],
        buffers=[Buffer("X", (n, c, h, w), "in"), Buffer("Y", (n, c, oh, ow), "out")],
        out_index=f"((b * {c} + ch) * {oh} + oh) * {ow} + ow",
        lets=[("ih", f"oh * {sh} + r"), ("iw", f"ow * {sw} + s")],
        term=f"{src}[((b * {c} + ch) * {hp} + ih) * {wp} + iw]",
        padding=Padding("X", "Xp", (n, c, h, w), tuple(pads),
                        "-FLT_MAX" if kind == "max" else "0.0f") if padded else None,
        flops=float(n * c * oh * ow * kh * kw))
    if kind == "max":
        compute.combine, compute.init = "max", "-FLT_MAX"
    elif count_include_pad or not padded:
        compute.epilogue = f"v * {1.0 / (kh * kw)!r}f"
    else:  # divide by the number of window points inside the image
        rows = (f"((oh * {sh} - {pads[0]} + {kh} < {h} ? oh * {sh} - {pads[0]} + {kh} : {h}) - "
                f"(oh * {sh} - {pads[0]} > 0 ? oh * {sh} - {pads[0]} : 0))")
        cols = (f"((ow * {sw} - {pads[1]} + {kw} < {w} ? ow * {sw} - {pads[1]} + {kw} : {w}) - "
                f"(ow * {sw} - {pads[1]} > 0 ? ow * {sw} - {pads[1]} : 0))")
        compute.epilogue = f"v / (float)({rows} * {cols})"
    return compute


def global_avg_pool(n: int, c: int, h: int, w: int, name: str = "gap") -> Compute:
    return Compute(name=name,
                   axes=[Axis("b", n, "spatial"), Axis("ch", c, "spatial"),
                         Axis("r", h, "reduce"), Axis("s", w, "reduce")],
                   buffers=[Buffer("X", (n, c, h, w), "in"), Buffer("Y", (n, c, 1, 1), "out")],
                   out_index=f"b * {c} + ch", term=f"X[((b * {c} + ch) * {h} + r) * {w} + s]",
                   epilogue=f"v * {1.0 / (h * w)!r}f", flops=float(n * c * h * w))


# -- schedule space ------------------------------------------------------------------------
ORDERS = ("reduce-inner", "reduce-middle", "tiled")


def schedule_space(compute: Compute, cores: int | None = None) -> Space:
    """Knobs: loop order template, tile factors of the channel-like and the innermost spatial
    axis, vectorize, unroll and threads. Invalid combinations are filtered by lowering them."""
    cores = cores or os.cpu_count() or 1
    threads = tuple(sorted({1, cores} | ({2} if cores >= 2 else set())))
    spatial = compute.spatial
    inner = spatial[-1].extent
    tile_x = tuple(f for f in (1, 4, 8, 16, 32) if f == 1 or f < inner)
    channel_axis = _channel_axis(compute)
    channel = compute.axis(channel_axis).extent if channel_axis else 1
    tile_c = tuple(f for f in (1, 2, 4, 8, 16) if f == 1 or f < channel)
    knobs = [Knob("order", ORDERS), Knob("tile_c", tile_c), Knob("tile_x", tile_x),
             Knob("vectorize", (True, False, "spatial")), Knob("unroll", (1, 2, 4, 8)),
             Knob("threads", threads)]

    def valid(config: Config) -> bool:
        try:
            make_schedule(compute, config).validate()
        except ScheduleError:
            return False
        return True

    return Space(knobs, valid)


def default_schedule_config(compute: Compute, cores: int | None = None) -> Config:
    """A sensible starting point (used as a seed for the strategies)."""
    cores = cores or os.cpu_count() or 1
    return {"order": "reduce-middle", "tile_c": 1, "tile_x": 1, "vectorize": True,
            "unroll": 1, "threads": cores}


def _channel_axis(compute: Compute) -> str | None:
    """The axis `tile_c` splits: output channels for NCHW computes (b, oc, oh, ow), rows for
    matrices (i, j), where the last axis is the one `tile_x` splits."""
    spatial = [a.name for a in compute.spatial]
    if len(spatial) > 2:
        return spatial[1]
    return spatial[0] if len(spatial) == 2 else None


def seed_configs(compute: Compute, cores: int | None = None) -> list[Config]:
    """One hand-picked starting point per loop-order template (strategies start from these)."""
    base = default_schedule_config(compute, cores)
    return [dict(base, order=order) for order in ORDERS] + \
        [dict(base, order="reduce-inner", vectorize="spatial")]


def make_schedule(compute: Compute, config: Config) -> Schedule:
    """The schedule `config` (a point of `schedule_space`) describes for `compute`."""
    sched = Schedule(compute)
    loops = _loop_order(sched, compute, config)
    if sorted(loops) != sorted(l.name for l in sched.loops):
        raise ScheduleError(f"order {config['order']} does not cover every loop")
    by_name = {l.name: l for l in sched.loops}
    sched.loops = [by_name[name] for name in loops]
    # parallelize the outermost loop (batch is usually 1: then the channel loop goes first)
    if sched.loops[0].extent == 1 and len(sched.loops) > 1 and sched.loops[1].kind == "spatial":
        first = sched.loops.pop(0)
        sched.loops.insert(1, first)
    _annotate(sched, config)
    return sched


def _loop_order(sched: Schedule, compute: Compute, config: Config) -> list[str]:
    """Splits the channel and last spatial axes of `sched` as `config` tiles them; the loop
    names in the order `config["order"]` puts them, outermost first."""
    spatial = [a.name for a in compute.spatial]
    reduce = [a.name for a in compute.reduce]
    channel = _channel_axis(compute)
    last = spatial[-1]
    c_outer = c_inner = channel
    if channel and config["tile_c"] > 1:
        c_outer, c_inner = sched.split(channel, config["tile_c"])
    x_outer, x_inner = sched.split(last, config["tile_x"]) if config["tile_x"] > 1 \
        else (last, last)
    middle = [s for s in spatial[:-1] if s != channel]
    head = [s for s in spatial[:1] if s != channel]
    rest = [s for s in middle if s not in head]
    split_c = c_outer != c_inner
    outer = head + [c_outer] + rest
    x_loops = [x_outer] if x_outer != x_inner else []
    c_tile = [c_inner] if split_c else []
    x_tile = [x_inner]
    order = config["order"]
    if order == "reduce-inner":
        loops = outer + x_loops + c_tile + x_tile + reduce
    elif order == "reduce-middle" or split_c:   # tiled with a channel tile: the same order
        loops = outer + x_loops + reduce + c_tile + x_tile
    else:  # tiled: the x tile inside the reduction (register blocking)
        loops = outer + reduce + x_loops + x_tile
    return [l for l in dict.fromkeys(loops) if l]


def _annotate(sched: Schedule, config: Config) -> None:
    """Marks the parallel, vectorized and unrolled loops of `sched` as `config` asks."""
    if config["threads"] > 1:
        sched.parallel(sched.loops[0].name, config["threads"])
    if config["vectorize"] == "spatial":  # outer-loop vectorization over the last spatial loop
        spatial_loops = [l.name for l in sched.loops if l.kind == "spatial"]
        sched.vectorize(spatial_loops[-1])
    elif config["vectorize"]:
        sched.vectorize(sched.loops[-1].name)
    if config["unroll"] > 1 and len(sched.loops) > 1:
        candidates = [l.name for l in sched.loops if l.name != sched.vectorized]
        sched.unroll(candidates[-1], config["unroll"])


def random_buffers(compute: Compute, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(b.shape).astype(np.float32) if b.role == "in"
            else np.empty(b.shape, np.float32) for b in compute.buffers]
