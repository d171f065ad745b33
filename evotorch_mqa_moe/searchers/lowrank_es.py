"""The low-rank evolution strategy (``lowrank-es``, after EGGROLL): antithetic low-rank
directions, centred-rank fitness shaping, and ClipUp (default) or Adam on the shared
weights.

Defaults (ClipUp, lr 0.1, max speed 0.2, sigma 0.05) were measured against ``pgpe`` on
reverse-16 and sort (``bench/lowrank_es_vs_pgpe.py``, docs/benchmarks.md): the former
Adam default (lr 0.01, sigma 0.02) moved every coordinate by ~lr whatever its signal and
stalled (reverse-12: 0.02 exact where ClipUp and pgpe reach 1.0).

The populations it evaluates are :mod:`evotorch_mqa_moe.model.lowrank`'s; the gradient
estimate is assembled from the factors, one (R, P/2 * r) x (P/2 * r, C) GEMM per
matrix, without materialising any individual.

The optimisers are ``torch.optim.Adam`` and EvoTorch's ``ClipUp`` (they replaced
hand-written copies; no measured reason kept those). ClipUp normalises the estimate by
its norm, so a zero estimate (every fitness tied) is skipped instead of stepping by 0/0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from evotorch.optimizers import ClipUp
from torch import Tensor

from evotorch_mqa_moe._internal.evotorch_compat import clipup_velocity, set_clipup_velocity
from evotorch_mqa_moe._internal.validate import check_float, check_int
from evotorch_mqa_moe.model import (
    LowRankPopulation,
    check_rank,
)

from .lowrank_noise import LowRankNoise, SeededLowRankNoise
from .registry import SearcherSpec, register


def centered_ranks(fitness: Tensor) -> Tensor:
    """Centred ranks in [-0.5, 0.5] of ``fitness`` (P,) (higher is better); tied values
    share the mean of their ranks, so equal fitness gives equal utility."""
    P = fitness.shape[0]
    if P < 2:
        return torch.zeros_like(fitness, dtype=torch.float32)
    ordered = fitness.sort().values
    low = torch.searchsorted(ordered, fitness, right=False)
    high = torch.searchsorted(ordered, fitness, right=True)
    rank = (low + high - 1).to(torch.float32) / 2  # 0 .. P-1, ties averaged
    return rank / (P - 1) - 0.5



# ----------------------------------------------------------------------------- optimisers
# The centre's optimisers are torch's Adam and EvoTorch's ClipUp, behind two small
# adapters that ascend the estimate and keep their state as flat tensors of length N
# (the checkpoint holds nothing per individual, and checkpoints written when the ES
# had hand-written optimisers, with the same field names, still load).


class _AdamAscent:
    """``torch.optim.Adam(maximize=True)`` on the centre (betas 0.9, 0.999; eps 1e-8)."""

    def __init__(self, center: Tensor, lr: float):
        self.center = center
        self.adam = torch.optim.Adam([center], lr=lr, maximize=True)

    def step(self, grad: Tensor) -> None:
        self.center.grad = grad
        self.adam.step()
        self.center.grad = None

    def state_dict(self) -> dict[str, Any]:
        state = self.adam.state.get(self.center)
        if not state:
            return {"steps": 0, "m": None, "v": None}
        return {"steps": int(state["step"]), "m": state["exp_avg"], "v": state["exp_avg_sq"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.state.clear()
        if state["m"] is not None:
            self.adam.state[self.center] = {
                "step": torch.tensor(float(state["steps"])),
                "exp_avg": state["m"].to(self.center), "exp_avg_sq": state["v"].to(self.center)}


class _ClipUpAscent:
    """EvoTorch's ClipUp (Toklu et al. 2020; EvoTorch's PGPE default) on the centre:
    normalised steps of ``lr`` with heavy-ball ``momentum``, speed clipped to ``max_speed``.

    A zero estimate (every fitness tied, so every utility equal) is skipped: ClipUp
    divides by the estimate's norm, and 0/0 would make the centre NaN.
    """

    def __init__(self, center: Tensor, lr: float, max_speed: float | None, momentum: float):
        self.center = center
        self.clipup = ClipUp(solution_length=center.numel(), dtype=center.dtype, stepsize=lr,
                             momentum=momentum, max_speed=2 * lr if max_speed is None
                             else max_speed, device=center.device)
        self.steps = 0

    def step(self, grad: Tensor) -> None:
        if bool(grad.any()):
            self.center.add_(self.clipup.ascent(grad, cloned_result=False))
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "velocity": clipup_velocity(self.clipup)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        set_clipup_velocity(self.clipup, state["velocity"].to(self.center))


OPTIMIZERS = ("adam", "clipup")
NOISES = ("seeded", "stored")


# ----------------------------------------------------------------------------- the searcher
class LowRankES:
    """Evolution strategy over low-rank populations (EGGROLL), behind the searcher protocol.

    One :meth:`step`: draw ``popsize / 2`` antithetic pairs of low-rank directions with
    the problem's generator, evaluate the ``popsize`` individuals in one low-rank pass
    on one fresh batch of the problem's data stream, shape the fitness into centred
    ranks, assemble the gradient estimate from the factors and take one optimiser
    step on the shared weights (the centre, float32).

    Args:
        problem: a :class:`~evotorch_mqa_moe.problem.TransformerProblem`; its
            ``compute_dtype`` (``--dtype``) is the population's and the forward's dtype
            (bfloat16: factors, shared weights' copy and pass in bf16; outputs, fitness,
            the gradient estimate and the optimiser in float32).
        popsize: individuals per generation, even (antithetic pairs), >= 2.
        sigma: perturbation scale (every perturbed entry has standard deviation sigma).
        rank: r, the rank of every matrix perturbation, in [1, min(R, C)] of every matrix.
        optimizer: ``"clipup"`` (default) or ``"adam"``.
        lr: the optimiser's learning rate (ClipUp: its step length).
        max_speed: ClipUp's velocity limit (default 2 * lr).
        momentum: ClipUp's momentum (Adam's beta1 stays 0.9).
        noise: ``"seeded"``: each generation's directions are regenerated, chunk by
            chunk, from one seed drawn from the problem's generator, in the forward
            pass and again in the update (:class:`SeededLowRankNoise`: nothing stored
            per individual); ``"stored"``: drawn once and kept as factors
            (:class:`LowRankNoise`, P x (r (R + C) + n) numbers).
    Raises:
        ValueError: naming a bad option and its value.
    """

    name = "lowrank-es"

    def __init__(self, problem: Any, *, popsize: int, sigma: float, rank: int = 1,
                 optimizer: str = "clipup", lr: float = 0.1, max_speed: float | None = None,
                 momentum: float = 0.9, noise: str = "seeded"):
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.noise = noise
        if check_int("popsize", popsize, 2) % 2:
            raise ValueError(f"popsize of lowrank-es must be an even integer >= 2 (antithetic "
                             f"pairs), got {popsize!r}")
        self.sigma = check_float("sigma", sigma)
        self.rank = check_rank(problem.config, rank)
        self.lr = check_float("lr", lr)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if max_speed is not None:
            check_float("max_speed", max_speed)
        check_float("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
        self.problem, self.popsize = problem, popsize
        self.compute_dtype = getattr(problem, "compute_dtype", torch.float32)
        self.center = problem.init_center().as_subclass(Tensor).to(problem.device, torch.float32)
        self.optimizer = (_AdamAscent(self.center, self.lr) if optimizer == "adam"
                          else _ClipUpAscent(self.center, self.lr, max_speed, momentum))
        self.steps = 0
        self._evaluations = 0
        self._best_eval = -math.inf
        self._pop_best = math.nan
        self._mean = math.nan

    def sample(self) -> tuple[LowRankNoise | SeededLowRankNoise, LowRankPopulation]:
        """The next generation's directions and population (draws from the problem's generator)."""
        config, pairs, generator = self.problem.config, self.popsize // 2, self.problem.generator
        if self.noise == "seeded":
            seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
            noise = SeededLowRankNoise(config, pairs, self.rank, int(seed.item()),
                                       device=self.center.device)
        else:
            noise = LowRankNoise(config, pairs, self.rank, generator=generator,
                                 device=self.center.device)
        population = noise.population(self.center, self.sigma, dtype=self.compute_dtype,
                                      output_dtype=torch.float32,
                                      chunk_size=self.problem.chunk_size,
                                      memory_budget=self.problem.memory_budget)
        return noise, population

    def step(self) -> None:
        """One generation: sample, evaluate on one fresh batch, update the centre."""
        from evotorch_mqa_moe.problem import replace_nonfinite

        noise, population = self.sample()
        self.problem.next_generation()
        with torch.no_grad():
            fitness = self.problem.task.fitness(population, self.problem.data_generator())
        fitness = torch.as_tensor(fitness).reshape(-1).to(self.center.device, torch.float32)
        if fitness.shape != (self.popsize,):
            raise ValueError(f"task {self.problem.task.name!r} returned {fitness.shape[0]} "
                             f"fitness values for {self.popsize} individuals")
        fitness, _ = replace_nonfinite(fitness)
        grad = noise.gradient(centered_ranks(fitness), self.sigma)
        self.optimizer.step(grad)
        self.steps += 1
        self._evaluations += self.popsize
        best, mean = torch.stack([fitness.max(), fitness.mean()]).tolist()  # one read-back
        self._pop_best, self._mean = best, mean
        if not self._best_eval >= best:
            self._best_eval = best

    @property
    def evaluations(self) -> int:
        """Forward-equivalents so far: ``popsize`` per generation."""
        return self._evaluations

    def current_solution(self) -> Tensor:
        """(N,) the shared weights (the distribution's centre), float32."""
        return self.center.detach().clone()

    @property
    def status(self) -> dict[str, Any]:
        """``iter``, ``best_eval`` (best so far), ``pop_best_eval``, ``mean_eval``, ``center``."""
        return {"iter": self.steps, "best_eval": self._best_eval,
                "pop_best_eval": self._pop_best, "mean_eval": self._mean,
                "center": self.current_solution()}

    def state_dict(self) -> dict[str, Any]:
        """Shared weights, optimiser state, generator state and counters (weights_only-safe)."""
        return {"kind": type(self).__name__, "center": self.center.clone(),
                "optimizer": {k: (v.clone() if isinstance(v, Tensor) else v)
                              for k, v in self.optimizer.state_dict().items()},
                "generator": self.problem.generator.get_state(),
                "steps": self.steps, "evaluations": self._evaluations,
                "best_eval": self._best_eval, "pop_best_eval": self._pop_best,
                "mean_eval": self._mean, "data_epoch": self.problem.data_epoch,
                "data_root": self.problem.data_root}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly from :meth:`state_dict` of a searcher built the same way."""
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {type(self).__name__} state_dict (it holds {kind!r})")
        center = state["center"]
        if center.shape != self.center.shape:
            raise ValueError(f"the saved centre has shape {tuple(center.shape)}, this problem "
                             f"{tuple(self.center.shape)}")
        device = self.center.device
        self.center.copy_(center.to(device, torch.float32))  # the optimiser holds it
        self.optimizer.load_state_dict({k: (v.to(device).clone() if isinstance(v, Tensor) else v)
                                        for k, v in state["optimizer"].items()})
        self.problem.generator.set_state(state["generator"])
        self.steps, self._evaluations = state["steps"], state["evaluations"]
        self._best_eval, self._pop_best = state["best_eval"], state["pop_best_eval"]
        self._mean = state["mean_eval"]
        self.problem.data_epoch = state["data_epoch"]
        self.problem.data_root = state["data_root"]


def build_lowrank_es(problem: Any, *, popsize: int, stdev: float, sigma: float | None = None,
                     rank: int = 1, optimizer: str = "clipup", lr: float = 0.1,
                     max_speed: float | None = None, momentum: float = 0.9,
                     noise: str = "seeded") -> LowRankES:
    """The registry's builder: ``sigma`` defaults to ``stdev`` (``--stdev``)."""
    return LowRankES(problem, popsize=popsize, sigma=stdev if sigma is None else sigma,
                     rank=rank, optimizer=optimizer, lr=lr, max_speed=max_speed,
                     momentum=momentum, noise=noise)


SEARCH_SPACE: dict[str, tuple] = {
    "stdev": ("log", 0.002, 0.2),
    "lr": ("log", 1e-3, 0.1),
    "rank": ("int", 1, 2),
    "optimizer": ("cat", ["adam", "clipup"]),
    "popsize": ("int", 20, 1000, 2),
}
"""Declarative tuning ranges (rank <= 2: the example tasks' smallest matrices are 2 wide)."""


register(SearcherSpec(
    "lowrank-es", "evolution strategy over low-rank populations (EGGROLL): shared weights "
    "+ rank-r factors per individual, regenerated from seeds, antithetic, centred ranks, "
    "ClipUp", build_lowrank_es, default_popsize=200, min_popsize=2,
    search_space=SEARCH_SPACE, default_stdev=0.05, dense_population=False))
