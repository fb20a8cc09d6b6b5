"""Search strategies over any `Space`: random (baseline), genetic algorithm (deap), REINFORCE.

Every strategy talks to the hardware only through an `Evaluator`, which measures a
configuration (or finds it in the tuning log), counts measurements against the budget and
keeps the history. Strategies never time anything themselves, so they are interchangeable.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from wpk.optimizer.cost_model import CostModel
from wpk.optimizer.database import TuningLog
from wpk.optimizer.space import Config, Space, config_key


EXPLORE = 0.25      # share of measurements given to proposals the cost model did not rank first
SCREEN = 4          # proposals per measurement where a strategy screens with the cost model


class BudgetExhausted(Exception):
    """Raised by the evaluator when the trial or time budget is spent."""


@dataclass
class Trial:
    config: Config
    ms: float
    reused: bool  # found in the tuning log, not measured again


@dataclass
class Evaluator:
    """Measure configurations of one task, through the tuning log, within a budget."""

    task: str
    measure: Callable[[Config], float]   # returns milliseconds; inf for a failed candidate
    hardware: str = "local"
    log: TuningLog | None = None
    max_trials: int | None = None        # new measurements allowed (log hits are free)
    max_seconds: float | None = None
    on_trial: Callable[[Trial], None] | None = None
    learn: bool = True                   # rank proposals with a cost model (`cost_model.py`)
    history: list[Trial] = field(default_factory=list)
    measured: int = 0
    _seen: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)
    _model: CostModel | None = None

    def exhausted(self) -> bool:
        if self.max_trials is not None and self.measured >= self.max_trials:
            return True
        return self.max_seconds is not None and \
            time.perf_counter() - self._start >= self.max_seconds

    def seen(self, config: Config) -> bool:
        return config_key(config) in self._seen

    def __call__(self, config: Config) -> float:
        key = config_key(config)
        if key in self._seen:
            return self._seen[key]
        cached = self.log.lookup(self.task, self.hardware, config) if self.log else None
        if cached is None:
            if self.exhausted():
                raise BudgetExhausted
            try:
                ms = float(self.measure(config))
            except Exception:  # a candidate that fails to build or run is just infinitely slow
                ms = math.inf
            self.measured += 1
            if self.log is not None and math.isfinite(ms):
                self.log.add(self.task, self.hardware, config, ms)
        else:
            ms = cached
        self._seen[key] = ms
        if self._model is not None:
            self._model.observe(self.task, config, ms)
        trial = Trial(config, ms, cached is not None)
        self.history.append(trial)
        if self.on_trial:
            self.on_trial(trial)
        return ms

    def shortlist(self, space: Space, proposals: list[Config], keep: int,
                  rng: np.random.Generator) -> list[Config]:
        """Which `keep` of `proposals` to measure: unseen and valid, the cost model's most
        promising first, each slot given to a random one with probability EXPLORE (a model
        fitted on few samples is confidently wrong often enough). Without `learn`, the
        first `keep` in proposal order."""
        fresh: dict[str, Config] = {}
        for config in proposals:
            key = config_key(config)
            if key not in self._seen and key not in fresh and space.valid(config):
                fresh[key] = config
        candidates = list(fresh.values())
        if not self.learn:
            return candidates[:keep]
        if self._model is None or self._model.space is not space:
            self._model = CostModel(space)
            self._model.observe_log(self.log, self.hardware)
            for trial in self.history:
                self._model.observe(self.task, trial.config, trial.ms)
        ranked = self._model.rank(self.task, candidates)
        chosen: list[Config] = []
        while ranked and len(chosen) < keep:
            index = int(rng.integers(len(ranked))) if rng.random() < EXPLORE else 0
            chosen.append(ranked.pop(index))
        return chosen

    @property
    def best(self) -> Trial | None:
        finite = [t for t in self.history if math.isfinite(t.ms)]
        return min(finite, key=lambda t: t.ms) if finite else None

    def best_curve(self) -> list[float]:
        """Best time after each new measurement (log hits excluded): the search's progress."""
        curve, best = [], math.inf
        for trial in self.history:
            best = min(best, trial.ms)
            if not trial.reused:
                curve.append(best)
        return curve


class Strategy(Protocol):
    name: str

    def search(self, space: Space, evaluate: Evaluator) -> Trial | None: ...


def _guarded(run: Callable[[], None], evaluate: Evaluator) -> Trial | None:
    try:
        run()
    except BudgetExhausted:
        pass
    return evaluate.best


class RandomSearch:
    """Uniform samples without repetition: the baseline every other strategy must beat."""

    name = "random"

    def __init__(self, seed: int = 0, seeds: list[Config] | None = None):
        self.rng = np.random.default_rng(seed)
        self.seeds = seeds or []

    def search(self, space: Space, evaluate: Evaluator) -> Trial | None:
        def run() -> None:
            for config in self.seeds:
                evaluate(config)
            misses = 0
            while misses < 200:
                config = space.sample(self.rng)
                if evaluate.seen(config):
                    misses += 1
                    continue
                misses = 0
                evaluate(config)
        return _guarded(run, evaluate)


class GeneticSearch:
    """deap's simple evolutionary loop over choice-index vectors: tournament selection,
    uniform crossover, per-gene random reset mutation, with an elite kept each generation."""

    name = "ga"

    def __init__(self, seed: int = 0, population: int = 12, generations: int = 50,
                 crossover: float = 0.6, mutation: float = 0.3,
                 seeds: list[Config] | None = None):
        self.seed, self.population, self.generations = seed, population, generations
        self.crossover, self.mutation = crossover, mutation
        self.seeds = seeds or []

    def search(self, space: Space, evaluate: Evaluator) -> Trial | None:
        import random

        from deap import base, tools

        rng = random.Random(self.seed)
        np_rng = np.random.default_rng(self.seed)
        highs = [n - 1 for n in space.cardinalities]

        def fitness(indices: list[int]) -> float:
            config = space.from_indices(indices)
            return evaluate(config) if space.valid(config) else math.inf

        def mutate(indices: list[int]) -> list[int]:
            for i, high in enumerate(highs):
                if rng.random() < 1.0 / max(len(highs), 1) + 0.1:
                    indices[i] = rng.randint(0, high)
            return indices

        toolbox = base.Toolbox()
        toolbox.register("select", tools.selTournament, tournsize=3)

        def breed(wrapped: list, count: int) -> list[list[int]]:
            chosen = [list(w) for w in toolbox.select(wrapped, count)]
            for a, b in zip(chosen[::2], chosen[1::2]):
                if rng.random() < self.crossover:
                    tools.cxUniform(a, b, indpb=0.5)
            children = [mutate(c) if rng.random() < self.mutation + 0.4 else c
                        for c in chosen]
            # a child identical to a measured config costs nothing; nudge duplicates once
            return [mutate(c) if evaluate.seen(space.from_indices(c)) else c
                    for c in children]

        def run() -> None:
            pop = [space.to_indices(c) for c in self.seeds]
            if evaluate.learn:   # a tuning log of similar tasks may rank the first ones too
                proposals = [space.sample(np_rng) for _ in range(SCREEN * self.population)]
                pop += [space.to_indices(c) for c in evaluate.shortlist(
                    space, proposals, self.population - len(pop), np_rng)]
            while len(pop) < self.population:
                pop.append(space.to_indices(space.sample(np_rng)))
            scores = [fitness(ind) for ind in pop]
            for _ in range(self.generations):
                ranked = sorted(zip(scores, pop), key=lambda item: item[0])
                elite = [list(ranked[0][1])]
                # deap's selTournament wants objects with .fitness; wrap minimally
                wrapped = [_Ind(ind, s) for s, ind in zip(scores, pop)]
                children = breed(wrapped, len(pop) - 1)
                if evaluate.learn:   # breed more, measure the cost model's shortlist
                    proposals = [space.from_indices(c) for _ in range(SCREEN)
                                 for c in breed(wrapped, len(pop) - 1)]
                    picked = [space.to_indices(c) for c in
                              evaluate.shortlist(space, proposals, len(pop) - 1, np_rng)]
                    children = picked + children[:len(pop) - 1 - len(picked)]
                pop = elite + children
                scores = [fitness(ind) for ind in pop]

        # deap's operators draw from the global `random`: seed it for this search only, so
        # that a seed gives the same search every time
        state = random.getstate()
        random.seed(self.seed)
        try:
            return _guarded(run, evaluate)
        finally:
            random.setstate(state)


class _Ind(list):
    """A list with a deap-style single-objective (minimizing) fitness."""

    _fitness_class = None

    def __init__(self, values: list[int], score: float):
        super().__init__(values)
        if _Ind._fitness_class is None:
            from deap import base

            _Ind._fitness_class = type("MinTime", (base.Fitness,), {"weights": (-1.0,)})
        self.fitness = _Ind._fitness_class((score if math.isfinite(score) else 1e30,))


class ReinforceSearch:
    """A policy-gradient tuner (REINFORCE): one independent softmax per knob, reward = -log
    time relative to a moving baseline, numpy only. The policy learns which choice of each
    knob tends to be fast and samples more of it, like an agent choosing schedule knobs."""

    name = "rl"

    def __init__(self, seed: int = 0, batch: int = 4, lr: float = 0.5, episodes: int = 200,
                 seeds: list[Config] | None = None):
        self.rng = np.random.default_rng(seed)
        self.batch, self.lr, self.episodes = batch, lr, episodes
        self.seeds = seeds or []

    def search(self, space: Space, evaluate: Evaluator) -> Trial | None:
        logits = [np.zeros(n) for n in space.cardinalities]

        def probs(l: np.ndarray) -> np.ndarray:
            e = np.exp(l - l.max())
            return e / e.sum()

        def draw() -> Config:
            for attempt in range(20):
                config = space.from_indices([int(self.rng.choice(len(l), p=probs(l)))
                                             for l in logits])
                if space.valid(config) and (not evaluate.seen(config) or attempt > 10):
                    break
            return config

        def run() -> None:
            for config in self.seeds:
                evaluate(config)
            baseline: float | None = None
            for _ in range(self.episodes):
                configs = [draw() for _ in range(self.batch)]
                if evaluate.learn:   # sample more from the policy, measure the shortlist
                    proposals = [draw() for _ in range(self.batch * SCREEN)]
                    picked = evaluate.shortlist(space, proposals, self.batch, self.rng)
                    configs = picked + configs[:self.batch - len(picked)]
                batch = []
                for config in configs:
                    choice = space.to_indices(config)
                    ms = evaluate(config) if space.valid(config) else math.inf
                    reward = -math.log(ms) if math.isfinite(ms) and ms > 0 else -50.0
                    batch.append((choice, reward))
                rewards = np.array([r for _, r in batch])
                mean = float(rewards.mean())
                baseline = mean if baseline is None else 0.8 * baseline + 0.2 * mean
                scale = float(rewards.std()) + 1e-6
                for choice, reward in batch:
                    advantage = (reward - baseline) / scale
                    for l, c in zip(logits, choice):
                        grad = -probs(l)
                        grad[c] += 1.0
                        l += self.lr * advantage * grad / len(batch)

        return _guarded(run, evaluate)


STRATEGIES: dict[str, type] = {"random": RandomSearch, "ga": GeneticSearch,
                               "rl": ReinforceSearch}


def make_strategy(name: str, seed: int = 0, seeds: list[Config] | None = None):
    from wpk.errors import refuse_unknown_choice

    refuse_unknown_choice(name, STRATEGIES, "search strategy")
    return STRATEGIES[name](seed=seed, seeds=seeds)
