"""Structured sparsity already in a model's weights: N:M, tile-wise, channel and block.

Every Conv, Gemm and MatMul whose weight is an initializer is read as a matrix W of shape
(outputs, K), K the reduction length (one row per output unit):

  Conv    W[Cout, Cin/group, kh, kw] -> (Cout, Cin/group*kh*kw), ONNX's order (kw fastest);
          N:M is also tried in the channels-last order (kh, kw, Cin) that NVIDIA's ASP uses
  Gemm    B[K, N] (transB=0) -> B^T;  B[N, K] (transB=1) -> B
  MatMul  B[K, N] (input 1, rank 2) -> B^T

In GEMM terms (Y = X B, B of shape K x N, N output columns) a row of W is a column of B.

What is found, per weight (`detect`):
  - N:M: every group of M consecutive weights along K holds at most N non-zeros (M in 4, 8,
    16; K a multiple of M); the smallest N that holds exactly, for the M that gives the
    highest guaranteed sparsity 1 - N/M.
  - tile-wise (Guo et al., SC 2020): B's columns cut into tiles of G (at multiples of G,
    as wpk-prune cuts them, or the non-zero columns packed in order); inside a tile whole
    rows (one k, the tile's live outputs) are zero, and whole columns are zero globally.
    The largest G (of 256 .. 4) whose zero columns and tile-rows hold at least
    EXPLAINED of the weight's zeros, when whole-matrix rows (G = all columns, i.e. input
    channels) do not already.
  - channel: whole output units (rows of W) and whole input positions (columns of W) that
    are zero, with the fraction of weights they hold.
  - block: aligned square blocks of W (b x b, b in 32 .. 2) that are all zero, the largest b
    whose blocks hold at least EXPLAINED of the zeros.
A structure is reported only where it explains (nearly) all of the weight's zeros, so that
unstructured magnitude pruning is reported as unstructured, and a dense weight as dense.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from wpk.naming import node_names

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
NM_GROUPS = (4, 8, 16)
TILE_WIDTHS = (256, 128, 64, 32, 16, 8, 4)
BLOCK_SIDES = (32, 16, 8, 4, 2)
# a structure is reported where its all-zero units hold at least this share of the zeros
EXPLAINED = 0.99
# N:M is reported where its guaranteed sparsity 1 - N/M is most of the zeros (a tile-wise
# 75 % weight holds 8:16 by accident; that says little about it)
NM_EXPLAINED = 0.9


@dataclass
class WeightSite:
    """A prunable weight: node, initializer, and the (outputs, K) matrix view of it."""
    node: str
    op: str
    weight: str            # initializer name
    shape: tuple[int, ...]
    trans_b: bool = False  # Gemm's transB
    group: int = 1         # Conv's group
    problem: str | None = None   # why it cannot be read as a matrix (then never pruned)

    def matrix(self, array: np.ndarray) -> np.ndarray:
        """The (outputs, K) view of the weight."""
        if self.op == "Conv":
            return array.reshape(array.shape[0], -1)
        if self.op == "Gemm" and self.trans_b:
            return array
        return array.T

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The weight's own layout again, from `matrix(...)`'s view."""
        if self.op == "Conv":
            return matrix.reshape(self.shape)
        if self.op == "Gemm" and self.trans_b:
            return matrix
        return matrix.T

    def channels_last(self, array: np.ndarray) -> np.ndarray | None:
        """Conv only: (Cout, kh*kw*Cin), the order N:M groups run in for NVIDIA's ASP."""
        if self.op != "Conv" or array.ndim < 3:
            return None
        return np.moveaxis(array, 1, -1).reshape(array.shape[0], -1)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def weight_sites(model: onnx.ModelProto) -> list[WeightSite]:
    """Every Conv/Gemm/MatMul of the main graph whose second input is an initializer, in
    graph order, named as everywhere in wpk (`<op>_<index>` for unnamed nodes)."""
    initializers = {t.name: t for t in model.graph.initializer}
    sites = []
    for node, name in zip(model.graph.node, node_names(list(model.graph.node))):
        if node.op_type not in PRUNABLE_OPS or len(node.input) < 2 or \
                node.input[1] not in initializers:
            continue
        tensor = initializers[node.input[1]]
        shape = tuple(int(d) for d in tensor.dims)
        site = WeightSite(name, node.op_type, node.input[1], shape,
                          trans_b=bool(_attr(node, "transB", 0)),
                          group=int(_attr(node, "group", 1)))
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                    onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            site.problem = f"{onnx.TensorProto.DataType.Name(tensor.data_type).lower()} " \
                           f"weight (float weights only)"
        elif node.op_type == "Conv" and len(shape) < 3:
            site.problem = f"Conv weight of rank {len(shape)}"
        elif node.op_type != "Conv" and len(shape) != 2:
            site.problem = f"{node.op_type} weight of rank {len(shape)} (rank 2 only)"
        sites.append(site)
    return sites


# --- what a matrix holds -------------------------------------------------------------------

def nm_holds(matrix: np.ndarray, m: int) -> int | None:
    """The smallest N such that every group of `m` consecutive weights along K holds at most
    N non-zeros; None where K is not a multiple of m."""
    rows, k = matrix.shape
    if k % m or k == 0 or rows == 0:
        return None
    return int((matrix.reshape(rows, k // m, m) != 0).sum(axis=-1).max())


def tile_zero_count(matrix: np.ndarray, width: int) -> tuple[int, int]:
    """(weights in all-zero output units, weights in all-zero tile-rows of the remaining
    units). Tiles are `width` output units (rows of W) either at multiples of `width` (as
    wpk-prune cuts them) or over the non-zero units packed in order (as Guo et al. describe
    it); the layout that explains more zeros counts."""
    zero = matrix == 0
    dead = zero.all(axis=1)
    in_columns = int(dead.sum()) * matrix.shape[1]
    alive = zero[~dead]
    packed = [alive[start:start + width] for start in range(0, alive.shape[0], width)]
    aligned = [zero[start:start + width][~dead[start:start + width]]
               for start in range(0, zero.shape[0], width)]
    in_rows = max(sum(int(tile.all(axis=0).sum()) * tile.shape[0] for tile in tiles if tile.size)
                  for tiles in (packed, aligned))
    return in_columns, in_rows


def block_zero_count(matrix: np.ndarray, side: int) -> int:
    """Weights in aligned all-zero side x side blocks (edges that do not fill a block
    are not counted)."""
    rows, k = (d - d % side for d in matrix.shape)
    if rows == 0 or k == 0:
        return 0
    blocks = (matrix[:rows, :k] == 0).reshape(rows // side, side, k // side, side)
    return int(blocks.all(axis=(1, 3)).sum()) * side * side


@dataclass
class Found:
    pattern: str            # "2:4", "tile:32", "channel", "block:4x4"
    fraction: float         # of the weight's elements that are zero through this structure
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerSparsity:
    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    zeros: float            # fraction of the weight's elements that are zero
    found: list[Found] = field(default_factory=list)
    problem: str | None = None

    @property
    def summary(self) -> str:
        if self.problem:
            return f"not read ({self.problem})"
        if self.zeros == 0:
            return "dense"
        if not self.found:
            return "unstructured"
        return ", ".join(f.pattern for f in self.found)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "weight": self.weight,
                "shape": list(self.shape), "zeros": self.zeros, "summary": self.summary,
                "found": [f.to_json() for f in self.found], "problem": self.problem}


def detect_matrix(matrix: np.ndarray, channels_last: np.ndarray | None = None) -> list[Found]:
    """The structures `matrix` (outputs, K) holds (see the module's doc)."""
    size = matrix.size
    zeros = int((matrix == 0).sum())
    if size == 0 or zeros == 0:
        return []
    found: list[Found] = []

    def enough(count: int) -> bool:
        return count > 0 and count >= EXPLAINED * zeros

    # channel: zero output units and zero input positions (whole rows / columns of W)
    dead_out = (matrix == 0).all(axis=1)
    dead_in = (matrix == 0).all(axis=0)
    channel = int(dead_out.sum()) * matrix.shape[1] + int(dead_in.sum()) * matrix.shape[0] \
        - int(dead_out.sum()) * int(dead_in.sum())
    if enough(channel):
        found.append(Found("channel", channel / size,
                           f"{int(dead_out.sum())}/{matrix.shape[0]} outputs, "
                           f"{int(dead_in.sum())}/{matrix.shape[1]} of K zero"))
    else:
        for width in TILE_WIDTHS:
            if width >= matrix.shape[0]:
                continue      # one tile: whole rows of B = input channels (checked above)
            columns, rows = tile_zero_count(matrix, width)
            if enough(columns + rows):
                found.append(Found(f"tile:{width}", (columns + rows) / size,
                                   f"{columns / size:.1%} in zero columns, {rows / size:.1%} "
                                   f"in zero rows of {width}-column tiles"))
                break
    # N:M, in the ONNX order and (Conv) channels-last, where channels or tiles do not
    # already explain the zeros (then N:M holds by accident)
    best: tuple[float, int, int, str] | None = None
    for layout, view in (("", matrix), (" channels-last", channels_last)):
        if view is None:
            continue
        for m in NM_GROUPS:
            n = nm_holds(view, m)
            if n is not None and n < m and 1 - n / m >= NM_EXPLAINED * zeros / size:
                key = (1 - n / m, -m)
                if best is None or key > (best[0], -best[2]):
                    best = (1 - n / m, n, m, layout)
    if best is not None and not found:
        _, n, m, layout = best
        found.append(Found(f"{n}:{m}", float(1 - n / m),
                           f"at most {n} non-zeros in every {m} along K{layout}"))
    for side in BLOCK_SIDES:
        covered = block_zero_count(matrix, side)
        if enough(covered):
            found.append(Found(f"block:{side}x{side}", covered / size,
                               f"aligned {side}x{side} blocks of (outputs, K)"))
            break
    return found


def detect(model: onnx.ModelProto,
           read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array
           ) -> list[LayerSparsity]:
    """Per prunable weight: its zero fraction and the structures found (module doc)."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = []
    for site in weight_sites(model):
        if site.problem:
            layers.append(LayerSparsity(site.node, site.op, site.weight, site.shape, 0.0,
                                        problem=site.problem))
            continue
        array = read(initializers[site.weight])
        matrix = site.matrix(array)
        layers.append(LayerSparsity(
            site.node, site.op, site.weight, site.shape,
            float((array == 0).sum() / max(array.size, 1)),
            detect_matrix(matrix, site.channels_last(array))))
    return layers
