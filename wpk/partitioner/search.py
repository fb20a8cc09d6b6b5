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
- `pareto` / `min_bytes`: sweeps the weight on bytes beyond the edge.
"""
from __future__ import annotations

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
    private: frozenset[str] = frozenset()  # tensors that may not cross link 0 (leakage bound)

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

    @property
    def stages_ms(self) -> np.ndarray:
        """Pipeline stage times: each tier's compute, each link's serialization (no RTT)."""
        return np.concatenate([self.compute_ms, self.serialization_ms])

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
    return Evaluation(tiers, latency, compute, fwd, ret, serialization, transfer, used, beyond,
                      fwd_names, ret_names)


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


def max_throughput(problem: Problem) -> np.ndarray:
    """Assignment minimizing the slowest stage, over cuts along the topological order; among
    those as good, the lowest latency (two passes of one DP: bottleneck, then latency)."""
    n, n_tiers = problem.n_nodes, problem.n_tiers
    prefix = np.vstack([np.zeros(n_tiers), np.cumsum(problem.node_ms, axis=0)])  # [n+1, T]
    fwd, ret = _crossing_bytes(problem)
    link_stage = (fwd + ret) * problem.link_ms_per_byte[:, None]               # [T-1, n+1]
    if n_tiers > 1:
        link_stage[0, _private_crossings(problem)] = np.inf   # a private tensor would cross
    # latency of link k when boundary k sits before node p: serialization plus half an RTT
    # per direction crossed (forward when anything lies beyond or results go there; back
    # when something beyond answers results that come back)
    beyond = np.arange(n + 1) < n
    links = np.arange(n_tiers - 1)[:, None]
    rtt_halves = (beyond | (problem.deliver_to > links)).astype(float) + \
        (beyond & (links >= problem.deliver_to))
    link_latency = link_stage + problem.link_rtt_ms[:, None] / 2 * rtt_halves
    # first_allowed[t][p]: smallest q such that nodes q..p-1 may all run on tier t
    first_allowed = np.zeros((n_tiers, n + 1), dtype=int)
    for t in range(n_tiers):
        blocked = (problem.lowest > t) | (problem.highest < t)
        last_blocked = -1
        for p in range(1, n + 1):
            if blocked[p - 1]:
                last_blocked = p - 1
            first_allowed[t, p] = last_blocked + 1

    def dp(cap: float | None) -> tuple[float, np.ndarray]:
        """cap None: the smallest bottleneck. Else: the lowest latency with every stage <=
        cap. Tiers take consecutive runs of nodes; best[p] covers nodes [0, p)."""
        choice = np.zeros((n_tiers, n + 1), dtype=int)
        best = np.where(np.arange(n + 1) == 0, 0.0, np.inf)
        for t in range(n_tiers):
            new = np.full(n + 1, np.inf)
            for p in range(n + 1):
                q = np.arange(first_allowed[t, p] if p > 0 else 0, p + 1)
                stage = prefix[p, t] - prefix[q, t]
                if cap is None:
                    values = np.maximum(best[q], stage)
                else:
                    values = np.where(stage <= cap, best[q] + stage, np.inf)
                j = int(np.argmin(values))
                new[p], choice[t, p] = values[j], q[j]
            if t < n_tiers - 1:
                if cap is None:
                    new = np.maximum(new, link_stage[t])
                else:
                    new = np.where(link_stage[t] <= cap, new + link_latency[t], np.inf)
            best = new
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

    bottleneck, _ = dp(None)
    return dp(bottleneck * (1 + 1e-9) + 1e-12)[1]


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
        moved = Problem(problem.node_ms, problem.tensors, problem.link_ms_per_byte,
                        problem.link_rtt_ms, problem.link_beyond_edge, lowest, highest,
                        problem.deliver_to, problem.private)
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


__all__ = ["TensorEdge", "Problem", "Evaluation", "evaluate", "feasible", "min_latency",
           "max_throughput", "pareto", "non_dominated", "min_bytes", "alternatives", "brute_force", "solve"]
