"""Where to cut: exact search over monotone assignments of a DAG's nodes to tiers.

Data only moves forward, so an assignment `tier[v]` is valid when every edge u -> v has
tier[u] <= tier[v]. A `Problem` holds everything the cost of an assignment depends on;
`evaluate` prices one assignment, and the solvers find the best one:

- `min_latency`: sequential latency (compute + transfers + RTTs), optionally plus a weight per
  byte sent beyond the edge, is a sum of pairwise submodular terms over the binary variables
  x[v,k] = [tier[v] >= k]. Its exact minimum is a minimum s-t cut (one layer of variables per
  boundary k; infinite edges keep x monotone in k and along edges; one auxiliary node per
  tensor and boundary so a tensor read by many consumers is paid once; one per boundary for
  the RTT paid when any node lies beyond it). Polynomial and exact for any number of tiers.
- `max_throughput`: minimizes the slowest pipeline stage (a tier's compute or a link's
  transfer) by dynamic programming over cut positions in the graph's topological order
  (exact over those cuts, which for chains are all cuts), then, among the cuts that reach
  that bottleneck, the lowest latency by the same DP; the min-latency assignment is
  evaluated too and the better kept.
- Dynamic batching (`Problem.max_batch` > 1): a tier whose nodes can all run in a batch,
  and which no tensor without the batch dimension enters or leaves, runs batches of
  `max_batch` requests where that is faster per request; its stage is then the
  per-request time at that batch (`batched_ms`). Whether a tier batches depends on the cut, so it is decided per segment in
  the throughput DP and per tier in `evaluate`, by the same rule (`tier_batches`). Latency is
  a lone request's (batch 1) throughout.
- `pareto` / `min_bytes`: sweeps the weight on bytes beyond the edge.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import networkx as nx
import numpy as np

from wpk.errors import ParameterError, WpkError


@dataclass(frozen=True)
class TensorEdge:
    """A tensor as the search sees it: who makes it, who reads it, what it weighs."""

    name: str
    nbytes: int
    producer: int                 # node index, or -1 for a model input (starts on tier 0)
    consumers: tuple[int, ...]
    is_output: bool = False
    carries_batch: bool = True    # has the batch dimension; False: a batched tier may not
    # send or receive it (a shape vector, a constant, a tensor whose rows were mixed)


@dataclass
class Problem:
    node_ms: np.ndarray                  # [n_nodes, n_tiers] compute time
    tensors: list[TensorEdge]
    link_ms_per_byte: np.ndarray         # [n_tiers - 1]; link k joins tiers k and k+1
    link_rtt_ms: np.ndarray              # [n_tiers - 1]
    link_beyond_edge: np.ndarray         # [n_tiers - 1] bool: counts as "beyond the edge"
    lowest: np.ndarray                   # [n_nodes] lowest tier allowed per node
    highest: np.ndarray                  # [n_nodes] highest tier allowed per node
    deliver_to: int = 0                  # tier that needs the model outputs
    # dynamic batching (throughput): per-request time when the node's tier runs batches of
    # max_batch, and which nodes may run in a batch at all
    batched_ms: np.ndarray | None = None  # [n_nodes, n_tiers]
    batchable: np.ndarray | None = None   # [n_nodes] bool
    max_batch: int = 1
    private: frozenset[str] = frozenset()  # tensors that may not cross link 0 (leakage bound)

    @property
    def batching(self) -> bool:
        return self.max_batch > 1 and self.batched_ms is not None

    @property
    def n_nodes(self) -> int:
        return self.node_ms.shape[0]

    @property
    def n_tiers(self) -> int:
        return self.node_ms.shape[1]


@dataclass
class Evaluation:
    """Everything the plan reports about one assignment."""

    tiers: np.ndarray
    latency_ms: float
    compute_ms: np.ndarray               # per tier
    forward_bytes: np.ndarray            # per link
    return_bytes: np.ndarray             # per link
    serialization_ms: np.ndarray         # per link: bytes both ways / bandwidth (no RTT)
    transfer_ms: np.ndarray              # per link: serialization + RTT share
    link_used: np.ndarray                # per link: does any request cross it
    bytes_beyond_edge: int
    forward_tensors: list[list[str]] = field(default_factory=list)  # per link
    return_tensors: list[list[str]] = field(default_factory=list)   # per link
    tier_batch: np.ndarray | None = None        # per tier: the batch it runs (1: none)
    stage_compute_ms: np.ndarray | None = None  # per tier: compute per request at that batch

    @property
    def stages_ms(self) -> np.ndarray:
        """Pipeline stage times per request: each tier's compute (at its batch), each link's
        serialization (no RTT; a batch of requests carries each request's bytes)."""
        compute = self.compute_ms if self.stage_compute_ms is None else self.stage_compute_ms
        return np.concatenate([compute, self.serialization_ms])

    @property
    def bottleneck_ms(self) -> float:
        return float(self.stages_ms.max())


def evaluate(problem: Problem, tiers: Sequence[int]) -> Evaluation:
    """Price one assignment (it must be monotone; `feasible` checks that)."""
    tiers = np.asarray(tiers, dtype=int)
    n_links = problem.n_tiers - 1
    d = problem.deliver_to
    compute = np.zeros(problem.n_tiers)
    np.add.at(compute, tiers, problem.node_ms[np.arange(problem.n_nodes), tiers])
    fwd = np.zeros(n_links, dtype=np.int64)
    ret = np.zeros(n_links, dtype=np.int64)
    fwd_names: list[list[str]] = [[] for _ in range(n_links)]
    ret_names: list[list[str]] = [[] for _ in range(n_links)]
    for tensor in problem.tensors:
        src = 0 if tensor.producer < 0 else tiers[tensor.producer]
        need = max((tiers[c] for c in tensor.consumers), default=src)
        if tensor.is_output:
            need = max(need, d)
        for k in range(src, need):        # link k joins tiers k and k+1
            fwd[k] += tensor.nbytes
            fwd_names[k].append(tensor.name)
        if tensor.is_output:
            for k in range(d, src):
                ret[k] += tensor.nbytes
                ret_names[k].append(tensor.name)
    top = int(tiers.max()) if len(tiers) else 0
    used = np.array([max(top, d) > k for k in range(n_links)], dtype=bool)
    returns = np.array([top > k >= d for k in range(n_links)], dtype=bool)
    serialization = (fwd + ret) * problem.link_ms_per_byte
    transfer = serialization + problem.link_rtt_ms / 2 * (used.astype(float) + returns)
    latency = float(compute.sum() + transfer.sum())
    beyond = int(((fwd + ret) * problem.link_beyond_edge).sum())
    batch = tier_batches(problem, tiers)
    stage = compute.copy()
    if problem.batching:
        stage = np.where(batch > 1, _batched_compute(problem, tiers), compute)
    return Evaluation(tiers, latency, compute, fwd, ret, serialization, transfer, used, beyond,
                      fwd_names, ret_names, batch, stage)


def _batched_compute(problem: Problem, tiers: np.ndarray) -> np.ndarray:
    """Per tier: compute per request if it ran all its nodes in batches."""
    batched = np.zeros(problem.n_tiers)
    np.add.at(batched, tiers, problem.batched_ms[np.arange(problem.n_nodes), tiers])
    return batched


def tier_batches(problem: Problem, tiers: Sequence[int]) -> np.ndarray:
    """The batch each tier runs under `tiers`: `max_batch` for a tier with nodes, all of them
    batchable, that no tensor without the batch dimension enters or leaves (a model output
    counts as leaving), and whose nodes take less time per request in a batch than alone;
    1 for every other tier."""
    tiers = np.asarray(tiers, dtype=int)
    batch = np.ones(problem.n_tiers, dtype=int)
    if not problem.batching or not len(tiers):
        return batch
    can = np.zeros(problem.n_tiers, dtype=bool)
    can[tiers] = True
    can[tiers[~problem.batchable]] = False
    for tensor in problem.tensors:
        if tensor.carries_batch:
            continue
        readers = {int(tiers[c]) for c in tensor.consumers}
        if tensor.producer < 0:                  # an input: every tier that reads it
            can[list(readers)] = False
            continue
        src = int(tiers[tensor.producer])
        away = readers - {src}
        can[list(away)] = False
        if away or tensor.is_output:
            can[src] = False
    lone = np.zeros(problem.n_tiers)
    np.add.at(lone, tiers, problem.node_ms[np.arange(problem.n_nodes), tiers])
    batch[can & (_batched_compute(problem, tiers) < lone)] = problem.max_batch
    return batch


def feasible(problem: Problem, tiers: Sequence[int]) -> bool:
    """Monotone along every tensor and within every node's allowed tiers."""
    tiers = np.asarray(tiers)
    if np.any(tiers < problem.lowest) or np.any(tiers > problem.highest):
        return False
    for tensor in problem.tensors:
        src = 0 if tensor.producer < 0 else tiers[tensor.producer]
        if any(tiers[c] < src for c in tensor.consumers):
            return False
        if tensor.name in problem.private and src == 0 and _needed_beyond_device(
                problem, tiers, tensor):
            return False
    return True


def _needed_beyond_device(problem: Problem, tiers: np.ndarray, tensor: TensorEdge) -> bool:
    """Does some consumer (or the tier receiving the outputs) lie beyond tier 0?"""
    return any(tiers[c] > 0 for c in tensor.consumers) or (
        tensor.is_output and problem.deliver_to > 0)


# -- exact minimum latency by minimum s-t cut -----------------------------------------------
_S, _T = "s", "t"
_UNITS_PER_MS = 1_000_000


class _CutGraph:
    """The s-t graph whose minimum cut is the best assignment: x[v,k] on the sink side means
    node v runs beyond boundary k (on tier k or higher)."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.graph.add_node(_S)
        self.graph.add_node(_T)

    def add(self, u, v, capacity_ms: float | None) -> None:
        """An edge u -> v (None: infinite capacity, a constraint); capacities add up."""
        # Integer capacities (ns): networkx reads the cut off saturated edges, which float
        # round-off can hide.
        graph = self.graph
        capacity = None if capacity_ms is None else int(round(capacity_ms * _UNITS_PER_MS))
        if capacity is None:   # networkx: an edge without 'capacity' has infinite capacity
            if graph.has_edge(u, v):
                graph[u][v].pop("capacity", None)
            else:
                graph.add_edge(u, v)
            return
        if capacity <= 0:
            return
        if graph.has_edge(u, v):
            if "capacity" in graph[u][v]:
                graph[u][v]["capacity"] += capacity
        else:
            graph.add_edge(u, v, capacity=capacity)

    def unary(self, var, cost_if_one: float) -> None:
        """cost_if_one * x (a negative cost is a constant plus |cost| * (1 - x))."""
        if cost_if_one > 0:
            self.add(_S, var, cost_if_one)      # cut when var lies on the sink side (x = 1)
        elif cost_if_one < 0:
            self.add(var, _T, -cost_if_one)     # cut when var lies on the source side (x = 0)


def min_latency(problem: Problem, byte_weight_ms: float = 0.0) -> np.ndarray:
    """The assignment minimizing latency + byte_weight_ms * bytes beyond the edge (exact)."""
    n, n_tiers = problem.n_nodes, problem.n_tiers
    if np.any(problem.lowest > problem.highest):
        bad = int(np.argmax(problem.lowest > problem.highest))
        raise WpkError(f"no tier is allowed for node #{bad}: its constraints contradict")
    if n_tiers == 1 or n == 0:
        return np.zeros(n, dtype=int)
    cut = _CutGraph()
    for k in range(1, n_tiers):
        link = k - 1
        per_byte = problem.link_ms_per_byte[link] + (
            byte_weight_ms if problem.link_beyond_edge[link] else 0.0)
        _add_node_terms(cut, problem, k)
        for i, tensor in enumerate(problem.tensors):
            _add_tensor_terms(cut, problem, k, i, tensor, tensor.nbytes * per_byte)
        # RTT of link k: paid once if anything lies beyond boundary k (both ways when the
        # results come back; forward only, as a constant, when they are delivered beyond).
        if problem.deliver_to < k:
            y = ("y", k)
            cut.add(_S, y, float(problem.link_rtt_ms[link]))
            for v in range(n):
                cut.add(y, ("x", v, k), None)
    _add_private_terms(cut, problem)
    try:
        _, (source_side, _) = nx.minimum_cut(cut.graph, _S, _T)
    except nx.NetworkXUnbounded:
        raise WpkError("the constraints cannot all hold (pins, privacy and the graph's "
                       "edges contradict)") from None
    tiers = np.zeros(n, dtype=int)
    for v in range(n):
        tiers[v] = sum(1 for k in range(1, n_tiers) if ("x", v, k) not in source_side)
    return tiers


def _add_private_terms(cut: _CutGraph, problem: Problem) -> None:
    """A private tensor never crosses link 0: its producer and consumers sit on the same side
    of boundary 1 (an infinite edge each way), so the cut stays exact."""
    for tensor in problem.tensors:
        if tensor.name not in problem.private:
            continue
        beyond = tensor.is_output and problem.deliver_to > 0
        if tensor.producer < 0:
            for c in tensor.consumers:
                cut.add(_S, ("x", c, 1), None)      # read on the device only
            if beyond:
                cut.add(_S, _T, None)               # the raw output must leave: impossible
            continue
        src = ("x", tensor.producer, 1)
        for c in tensor.consumers:
            cut.add(src, ("x", c, 1), None)         # x[c,1] <= x[p,1] (>= is monotonicity)
        if beyond:
            cut.add(src, _T, None)                  # made beyond the device


def _add_node_terms(cut: _CutGraph, problem: Problem, k: int) -> None:
    """Per node at boundary k: what running beyond it saves or costs, the pins, and
    x[v,k] <= x[v,k-1]."""
    for v in range(problem.n_nodes):
        x = ("x", v, k)
        cut.graph.add_node(x)
        cut.unary(x, problem.node_ms[v, k] - problem.node_ms[v, k - 1])
        if problem.lowest[v] >= k:
            cut.add(x, _T, None)            # forced to 1
        if problem.highest[v] < k:
            cut.add(_S, x, None)            # forced to 0
        if k > 1:
            cut.add(("x", v, k - 1), x, None)   # x[v,k] <= x[v,k-1]


def _add_tensor_terms(cut: _CutGraph, problem: Problem, k: int, i: int, tensor: TensorEdge,
                      weight: float) -> None:
    """Tensor i at boundary k: monotone edges, and `weight` (its cost over link k) paid
    where it crosses that link."""
    d = problem.deliver_to
    src = ("x", tensor.producer, k) if tensor.producer >= 0 else None
    for c in tensor.consumers:         # monotone: x[p,k] <= x[c,k]
        if src is not None:
            cut.add(("x", c, k), src, None)
    needed_anyway = tensor.is_output and d >= k
    if needed_anyway:                  # crosses link k unless made beyond it
        if src is None:
            return                     # constant
        cut.add(src, _T, weight)       # paid when x[p,k] = 0
    elif tensor.consumers:
        if len(tensor.consumers) == 1:
            need = ("x", tensor.consumers[0], k)
        else:
            need = ("z", i, k)         # z >= x[c,k] for every consumer
            for c in tensor.consumers:
                cut.add(need, ("x", c, k), None)
        if src is None:
            cut.add(_S, need, weight)  # paid when needed beyond k
        else:
            cut.add(src, need, weight)  # paid when x[p,k] = 0 and needed
    if tensor.is_output and k > d and src is not None:
        cut.unary(src, weight)         # result travels back over link k


# -- throughput: slowest stage, DP over cut positions in topological order -----------------
def _crossing_bytes(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """fwd[k, p], ret[k, p]: bytes over link k when boundary k sits before node p."""
    n, n_links, d = problem.n_nodes, problem.n_tiers - 1, problem.deliver_to
    fwd = np.zeros((n_links, n + 1))
    ret = np.zeros((n_links, n + 1))
    for tensor in problem.tensors:
        first = tensor.producer + 1            # positions p > producer see it produced
        last = max(tensor.consumers, default=-1)
        for k in range(n_links):
            end = n if (tensor.is_output and d > k) else last
            if end >= first:
                fwd[k, first:end + 1] += tensor.nbytes
            if tensor.is_output and k >= d:
                ret[k, :first] += tensor.nbytes
    return fwd, ret


def _private_crossings(problem: Problem) -> np.ndarray:
    """Boundary-0 positions p (nodes before p on the device) where a private tensor crosses."""
    n = problem.n_nodes
    mask = np.zeros(n + 1, dtype=bool)
    for tensor in problem.tensors:
        if tensor.name in problem.private:
            end = n if (tensor.is_output and problem.deliver_to > 0) \
                else max(tensor.consumers, default=-1)
            mask[tensor.producer + 1:end + 1] = True
    return mask


class _Segments:
    """Stage times of runs of consecutive nodes [q, p) (topological order) on one tier: a
    lone request's compute, and the per-request stage, batched where the run may batch and
    that is faster (the rule of `tier_batches`, for a tier that runs exactly those nodes)."""

    def __init__(self, problem: Problem):
        n, n_tiers = problem.n_nodes, problem.n_tiers
        self.n = n
        self.prefix = np.vstack([np.zeros(n_tiers), np.cumsum(problem.node_ms, axis=0)])
        self.batching = problem.batching
        if not self.batching:
            return
        self.prefix_batched = np.vstack([np.zeros(n_tiers),
                                         np.cumsum(problem.batched_ms, axis=0)])
        # floor[p]: [q, p) may batch only if q > floor[p] (a node that cannot batch, or a
        # tensor without the batch dimension made inside and needed beyond p)
        floor = np.full(n + 1, -1)
        for p in range(1, n + 1):
            floor[p] = p - 1 if not problem.batchable[p - 1] else floor[p - 1]
        # reads[c]: producers (-1: the model input) of such tensors that node c reads
        self.reads: list[list[int]] = [[] for _ in range(n)]
        for tensor in problem.tensors:
            if tensor.carries_batch:
                continue
            for c in tensor.consumers:
                self.reads[c].append(tensor.producer)
            if tensor.producer >= 0:
                last = n if tensor.is_output else max(tensor.consumers, default=-1)
                span = slice(tensor.producer + 1, last + 1)
                floor[span] = np.maximum(floor[span], tensor.producer)
        self.floor = floor

    def batch_masks(self):
        """For p = 0 .. n in turn: over q = 0 .. n, may [q, p) run batched."""
        q = np.arange(self.n + 1)
        entered = np.zeros(self.n + 1, dtype=bool)   # a run from q takes such a tensor in
        for p in range(self.n + 1):
            if p > 0:
                for producer in self.reads[p - 1]:
                    entered[producer + 1:p] = True
            yield (q > self.floor[p]) & ~entered

    def stages(self, t: int, p: int, q: np.ndarray, may_batch: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(per-request stage, lone-request compute) of the runs [q, p) on tier t."""
        lone = self.prefix[p, t] - self.prefix[q, t]
        if may_batch is None:
            return lone, lone
        batched = self.prefix_batched[p, t] - self.prefix_batched[q, t]
        return np.where(may_batch[q], np.minimum(batched, lone), lone), lone


class _ThroughputSearch:
    """The DP of `max_throughput`: tiers take consecutive runs of nodes in topological
    order; `run(None)` finds the smallest bottleneck, `run(cap)` the lowest latency with
    every stage <= cap."""

    def __init__(self, problem: Problem):
        n, n_tiers = problem.n_nodes, problem.n_tiers
        self.problem = problem
        self.segments = _Segments(problem)
        fwd, ret = _crossing_bytes(problem)
        self.link_stage = (fwd + ret) * problem.link_ms_per_byte[:, None]        # [T-1, n+1]
        if n_tiers > 1:     # a private tensor would cross the device's link there
            self.link_stage[0, _private_crossings(problem)] = np.inf
        # latency of link k when boundary k sits before node p: serialization plus half an
        # RTT per direction crossed (forward when anything lies beyond or results go there;
        # back when something beyond answers results that come back)
        beyond = np.arange(n + 1) < n
        links = np.arange(n_tiers - 1)[:, None]
        rtt_halves = (beyond | (problem.deliver_to > links)).astype(float) + \
            (beyond & (links >= problem.deliver_to))
        self.link_latency = self.link_stage + problem.link_rtt_ms[:, None] / 2 * rtt_halves
        # first_allowed[t][p]: smallest q such that nodes q..p-1 may all run on tier t
        self.first_allowed = np.zeros((n_tiers, n + 1), dtype=int)
        for t in range(n_tiers):
            blocked = (problem.lowest > t) | (problem.highest < t)
            last_blocked = -1
            for p in range(1, n + 1):
                if blocked[p - 1]:
                    last_blocked = p - 1
                self.first_allowed[t, p] = last_blocked + 1

    def _tier(self, t: int, best: np.ndarray, cap: float | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """best[p] over nodes [0, p) once tier t has taken its run, and each run's start."""
        n = self.problem.n_nodes
        new = np.full(n + 1, np.inf)
        choice = np.zeros(n + 1, dtype=int)
        masks = self.segments.batch_masks() if self.segments.batching else None
        for p in range(n + 1):
            may_batch = next(masks) if masks is not None else None
            q = np.arange(self.first_allowed[t, p] if p > 0 else 0, p + 1)
            stage, lone = self.segments.stages(t, p, q, may_batch)
            if cap is None:
                values = np.maximum(best[q], stage)
            else:
                values = np.where(stage <= cap, best[q] + lone, np.inf)
            j = int(np.argmin(values))
            new[p], choice[p] = values[j], q[j]
        if t < self.problem.n_tiers - 1:
            if cap is None:
                new = np.maximum(new, self.link_stage[t])
            else:
                new = np.where(self.link_stage[t] <= cap, new + self.link_latency[t], np.inf)
        return new, choice

    def run(self, cap: float | None) -> tuple[float, np.ndarray]:
        """cap None: the smallest bottleneck. Else: the lowest latency with every stage <=
        cap. Tiers take consecutive runs of nodes; best[p] covers nodes [0, p)."""
        n, n_tiers = self.problem.n_nodes, self.problem.n_tiers
        choice = np.zeros((n_tiers, n + 1), dtype=int)
        best = np.where(np.arange(n + 1) == 0, 0.0, np.inf)
        for t in range(n_tiers):
            best, choice[t] = self._tier(t, best, cap)
        if not np.isfinite(best[n]):
            raise WpkError("the constraints cannot all hold (pins, privacy and the graph's "
                           "edges contradict)")
        tiers = np.zeros(n, dtype=int)
        p = n
        for t in range(n_tiers - 1, -1, -1):
            q = choice[t, p]
            tiers[q:p] = t
            p = q
        return float(best[n]), tiers


def max_throughput(problem: Problem) -> np.ndarray:
    """Assignment minimizing the slowest stage, over cuts along the topological order; among
    those as good, the lowest latency (two passes of one DP: bottleneck, then latency).
    With batching, a tier's stage is batched where its run of nodes may batch."""
    dp = _ThroughputSearch(problem)
    bottleneck, _ = dp.run(None)
    return dp.run(bottleneck * (1 + 1e-9) + 1e-12)[1]


# -- bytes beyond the edge ------------------------------------------------------------------
def byte_weights(problem: Problem) -> list[float]:
    """Weights (ms per byte beyond the edge) from 0 up to where bytes dominate everything."""
    total_ms = float(problem.node_ms.max(axis=1).sum() + problem.link_rtt_ms.sum()) + 1.0
    smallest_tensor = min((t.nbytes for t in problem.tensors if t.nbytes), default=1)
    top = total_ms / smallest_tensor * 10
    return [0.0] + list(np.geomspace(top * 1e-9, top, 40))


def pareto(problem: Problem) -> list[Evaluation]:
    """Latency / bytes-beyond-edge trade-offs, best latency first, non-dominated only."""
    seen: dict[tuple[int, ...], Evaluation] = {}
    for weight in byte_weights(problem):
        tiers = min_latency(problem, weight)
        seen.setdefault(tuple(tiers), evaluate(problem, tiers))
    return non_dominated(list(seen.values()))


def non_dominated(points: Sequence[Evaluation]) -> list[Evaluation]:
    """The points no other point beats in both latency and bytes beyond the edge."""
    front: list[Evaluation] = []
    for point in sorted(points, key=lambda e: (e.latency_ms, e.bytes_beyond_edge)):
        if not front or point.bytes_beyond_edge < front[-1].bytes_beyond_edge:
            front.append(point)
    return front


def min_bytes(problem: Problem, max_latency_ms: float | None) -> np.ndarray:
    """Fewest bytes beyond the edge whose latency meets the SLO (on the swept front)."""
    front = pareto(problem)
    ok = [e for e in front if max_latency_ms is None or e.latency_ms <= max_latency_ms + 1e-9]
    if not ok:
        raise ParameterError(f"impossible constraint: the fastest plan takes "
                             f"{front[0].latency_ms:.2f} ms > {{max_latency_ms}} "
                             f"{max_latency_ms:g}", "max_latency_ms")
    return min(ok, key=lambda e: (e.bytes_beyond_edge, e.latency_ms)).tiers


def alternatives(problem: Problem, tiers: np.ndarray, limit: int = 12) -> list[np.ndarray]:
    """Next-best cuts near `tiers`: for each node beside a cut, the optimum with that node
    moved one tier across the cut (each an exact min-cut under that extra pin)."""
    beside_cut: list[tuple[int, int]] = []
    for tensor in problem.tensors:
        if tensor.producer < 0:
            continue
        for c in tensor.consumers:
            if tiers[c] > tiers[tensor.producer]:
                beside_cut.append((tensor.producer, int(tiers[tensor.producer]) + 1))
                beside_cut.append((c, int(tiers[c]) - 1))
    found: list[np.ndarray] = []
    for v, tier in list(dict.fromkeys(beside_cut))[:limit]:
        if not problem.lowest[v] <= tier <= problem.highest[v]:
            continue
        lowest, highest = problem.lowest.copy(), problem.highest.copy()
        lowest[v] = highest[v] = tier
        moved = dataclasses.replace(problem, lowest=lowest, highest=highest)
        try:
            found.append(min_latency(moved))
        except WpkError:
            continue
    return found


def brute_force(problem: Problem, key=lambda e: e.latency_ms) -> Evaluation:
    """Best feasible assignment by enumeration: for tests on small graphs only."""
    import itertools

    best: Evaluation | None = None
    for tiers in itertools.product(range(problem.n_tiers), repeat=problem.n_nodes):
        if feasible(problem, tiers):
            evaluation = evaluate(problem, tiers)
            if best is None or key(evaluation) < key(best) - 1e-12:
                best = evaluation
    if best is None:
        raise WpkError("no feasible assignment")
    return best


def solve(problem: Problem, objective: str, max_latency_ms: float | None = None) -> np.ndarray:
    """Dispatch on the objective name: latency, throughput or bandwidth."""
    if objective in ("latency", "throughput"):
        fastest = evaluate(problem, min_latency(problem))
        if max_latency_ms is not None and fastest.latency_ms > max_latency_ms:
            raise ParameterError(f"impossible constraint: the fastest plan takes "
                                 f"{fastest.latency_ms:.2f} ms > {{max_latency_ms}} "
                                 f"{max_latency_ms:g}", "max_latency_ms")
        if objective == "latency":
            return fastest.tiers
        try:
            candidates = [evaluate(problem, max_throughput(problem)), fastest]
        except WpkError:   # no cut along the topological order meets the constraints
            candidates = [fastest]
        if max_latency_ms is not None:   # the fastest plan always meets it (checked above)
            candidates = [c for c in candidates if c.latency_ms <= max_latency_ms]
        return min(candidates, key=lambda e: (round(e.bottleneck_ms, 9), e.latency_ms)).tiers
    if objective == "bandwidth":
        return min_bytes(problem, max_latency_ms)
    raise WpkError(f"unknown objective {objective!r} (latency, throughput, bandwidth)")


__all__ = ["TensorEdge", "Problem", "Evaluation", "evaluate", "tier_batches", "feasible",
           "min_latency", "max_throughput", "pareto", "non_dominated", "min_bytes",
           "alternatives", "brute_force", "solve"]
