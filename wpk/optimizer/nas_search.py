"""The search of `wpk-nas`: NSGA-II (deap) over the `mbconv` space, two objectives.

- **Latency**: the architecture's best partitioned latency across the tiers, from each
  tier's latency table (or the roofline), exact over cuts and machines
  (`wpk.partitioner.api.execute`): the device's blocks are priced by the device's table.
- **Proxy**: the NASWOT score at initialization (`nas_proxy`), higher is better.

An architecture over the latency bound is penalized in its proxy in proportion to the
excess, so that the population moves toward the bound; the answer is the Pareto set of the
architectures evaluated that meet it. MobileNetV2 at each width seeds the population.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.optimizer.nas_proxy import naswot_score
from wpk.optimizer.nas_space import WIDTHS, Architecture, build, gene_ranges, mobilenet_v2, \
    parameters
from wpk.partitioner.api import PartitionResult, execute
from wpk.partitioner.request import PartitionRequest

PENALTY = 100.0     # proxy points per unit of latency excess (latency / bound - 1)


@dataclass
class Evaluated:
    arch: Architecture
    latency_ms: float              # predicted, best partitioned plan
    score: float                   # NASWOT
    params: int
    result: PartitionResult        # the plan (decided, not written)

    def dominates(self, other: "Evaluated") -> bool:
        return (self.latency_ms <= other.latency_ms and self.score >= other.score
                and (self.latency_ms < other.latency_ms or self.score > other.score))


class Evaluator:
    """Builds, plans and scores architectures, each once."""

    def __init__(self, request_for: Callable[[Graph], PartitionRequest], image_size: int,
                 proxy_size: int, proxy_batch: int, seed: int = 0):
        self.request_for, self.image_size = request_for, image_size
        self.proxy_size, self.proxy_batch, self.seed = proxy_size, proxy_batch, seed
        self.seen: dict[tuple[int, ...], Evaluated] = {}

    def __call__(self, arch: Architecture) -> Evaluated:
        key = tuple(arch.genes())
        if key not in self.seen:
            graph = Graph.load(build(arch, self.image_size, seed=self.seed), name="nas")
            result = execute(self.request_for(graph))
            score = naswot_score(arch, self.proxy_size, self.proxy_batch, self.seed)
            self.seen[key] = Evaluated(arch, result.best.evaluation.latency_ms, score,
                                       parameters(arch), result)
        return self.seen[key]


def pareto(points: list[Evaluated], bound: float | None) -> list[Evaluated]:
    """The architectures meeting the bound that no other one beats in both objectives,
    fastest first."""
    ok = [p for p in points if bound is None or p.latency_ms <= bound]
    front = [p for p in ok if not any(q.dominates(p) for q in ok)]
    unique = {tuple(p.arch.genes()): p for p in front}
    return sorted(unique.values(), key=lambda p: p.latency_ms)


def _toolbox(evaluate: Callable[[Architecture], Evaluated], bound: float | None,
             rng: random.Random):
    from deap import base, creator, tools

    if not hasattr(creator, "WpkNasFitness"):
        creator.create("WpkNasFitness", base.Fitness, weights=(-1.0, 1.0))
        creator.create("WpkNasIndividual", list, fitness=creator.WpkNasFitness)
    ranges = gene_ranges()
    toolbox = base.Toolbox()
    toolbox.register("individual", lambda: creator.WpkNasIndividual(
        rng.randint(low, high) for low, high in ranges))

    def fitness(individual) -> tuple[float, float]:
        found = evaluate(Architecture.from_genes(list(individual)))
        excess = 0.0 if bound is None else max(found.latency_ms / bound - 1.0, 0.0)
        return found.latency_ms, found.score - PENALTY * excess

    toolbox.register("evaluate", fitness)
    toolbox.register("mate", tools.cxUniform, indpb=0.5)
    toolbox.register("mutate", tools.mutUniformInt, low=[lo for lo, _ in ranges],
                     up=[hi for _, hi in ranges], indpb=0.1)
    toolbox.register("select", tools.selNSGA2)
    return toolbox, creator.WpkNasIndividual


def search(evaluate: Evaluator, bound: float | None, population: int = 16,
           generations: int = 8, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> list[Evaluated]:
    """NSGA-II for `generations`; returns the Pareto set within `bound`."""
    from deap import algorithms

    if population < 4 or generations < 1:
        raise WpkError("--population must be at least 4 and --generations at least 1")
    state = random.getstate()
    random.seed(seed)                  # deap's operators draw from the random module
    rng = random.Random(seed)
    try:
        toolbox, individual = _toolbox(evaluate, bound, rng)
        seeds = [individual(mobilenet_v2(w).genes()) for w in WIDTHS]
        members = (seeds + [toolbox.individual() for _ in range(population)])[:population]
        for member in members:
            member.fitness.values = toolbox.evaluate(member)
        members = toolbox.select(members, population)
        for generation in range(generations):
            children = algorithms.varAnd(members, toolbox, cxpb=0.7, mutpb=0.5)
            for child in children:
                if not child.fitness.valid:
                    child.fitness.values = toolbox.evaluate(child)
            members = toolbox.select(members + children, population)
            if progress is not None:
                progress(generation + 1, generations)
    finally:
        random.setstate(state)
    return pareto(list(evaluate.seen.values()), bound)
