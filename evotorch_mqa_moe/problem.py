"""`TransformerProblem`: a Task as an EvoTorch `NEProblem`, evaluated a population at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from evotorch import SolutionBatch
from evotorch.neuroevolution import NEProblem
from loguru import logger
from torch import Tensor, nn

from .config import TransformerConfig
from .genes import gene_groups
from .model import MQAMoETransformer, PopulationModel, init_parameters, num_parameters
from .task import Task

__all__ = ["TransformerProblem", "worst_for_nonfinite"]

DATA_REFRESH = ("evaluation", "generation", "never")


def worst_for_nonfinite(fitness: Tensor) -> tuple[Tensor, int]:
    """Replace NaN/inf fitness (maximised) by a finite value below every finite one.

    The replacement is ``min - (max - min) - 1`` over the finite entries, so it
    loses every comparison, keeps rank- and value-based searchers finite, and
    leaves the other individuals untouched. Returns the new fitness and how
    many entries were replaced.
    """
    finite = torch.isfinite(fitness)
    bad = int((~finite).sum())
    if bad == 0:
        return fitness, 0
    if bad == fitness.numel():
        return torch.full_like(fitness, -1e30), bad
    good = fitness[finite]
    worst = good.min() - (good.max() - good.min()) - 1.0
    return torch.where(finite, fitness, worst), bad


class TransformerProblem(NEProblem):
    """Evolve an :class:`MQAMoETransformer` on a :class:`~evotorch_mqa_moe.task.Task`.

    Solutions are flat parameter vectors (N = the model's parameter count, in
    ``parameters_to_vector`` order). Every evaluation runs the whole batch through
    :func:`~evotorch_mqa_moe.model.population_forward` (chunked to a memory
    budget); all individuals of one data epoch see the same data.

    Args:
        task: what to solve (see :class:`~evotorch_mqa_moe.task.Task`).
        config: the architecture; ``None`` takes ``task.default_config()``.
        seed: seeds the problem's generator (initial populations, operators)
            and the data stream; ``None`` draws both from torch's global RNG.
        device: where populations live and evaluation runs (``"cuda"`` on a GPU).
        data_refresh: ``"evaluation"`` (default): fresh data for every call to
            ``evaluate``; ``"generation"``: fresh data only when
            :meth:`next_generation` is called (hook it to a searcher with
            :meth:`refresh_data_each_step` so parents and children of one GA
            generation are compared on the same batch); ``"never"``: one fixed
            batch for the whole run.
        chunk_size, memory_budget: see :func:`~evotorch_mqa_moe.model.population_forward`.
        num_actors, num_gpus_per_actor, actor_config, num_subbatches, subbatch_size:
            EvoTorch's Ray parallelism; each actor evaluates its piece vectorised.

    Fitness is maximised. Individuals whose fitness is NaN/inf get a finite value
    worse than every finite one (one warning per evaluation says how many).
    """

    def __init__(
        self,
        task: Task,
        config: TransformerConfig | None = None,
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
        data_refresh: str = "evaluation",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        num_actors: int | str | None = None,
        num_gpus_per_actor: int | float | str | None = None,
        actor_config: dict | None = None,
        num_subbatches: int | None = None,
        subbatch_size: int | None = None,
    ):
        for attr in ("fitness", "metrics", "default_config"):
            if not callable(getattr(task, attr, None)):
                raise TypeError(f"task must implement the Task protocol; it has no {attr}()")
        if config is None:
            config = task.default_config()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if data_refresh not in DATA_REFRESH:
            raise ValueError(f"data_refresh must be one of {DATA_REFRESH}, got {data_refresh!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.task = task
        self.config = config
        self.data_refresh = data_refresh
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        # The data stream is separate from the searcher's random numbers, so every
        # searcher run with the same seed sees the same sequence of batches.
        if seed is None:
            seed_bits = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        else:
            seed_bits = seed
        self._data_root = int(np.random.SeedSequence([seed_bits, 0xDA7A]).generate_state(1)[0])
        self._data_epoch = 0
        self._data_seed: int | None = None
        self.evaluations = 0  # solutions evaluated so far (counted in the main process)
        super().__init__(
            "max",
            MQAMoETransformer,
            network_args={"config": config},
            initial_bounds=None,
            seed=seed,
            device=device,
            num_actors=num_actors,
            num_gpus_per_actor=num_gpus_per_actor,
            actor_config=actor_config,
            num_subbatches=num_subbatches,
            subbatch_size=subbatch_size,
        )

    # ------------------------------------------------------------ networks
    def _instantiate_net(self, network: Any, device: Any = None) -> nn.Module:
        # Always rebuild from the config: NEProblem._prepare drops the original
        # network, which in EvoTorch 0.6.1 makes an unpickled problem unusable.
        return MQAMoETransformer(self.config).to(self.network_device if device is None else device)

    def _prepare(self) -> None:
        self.instantiated_network = self._instantiate_net(None)

    def seed(self, seed: int | None = None) -> None:
        """Reseed the problem's generator (Ray actors call this; EvoTorch 0.6.1 lacks it)."""
        self.manual_seed(seed)

    def init_population(self, popsize: int) -> Tensor:
        """(popsize, N) freshly initialised networks, drawn with the problem's generator."""
        return init_parameters(self.config, popsize, generator=self.generator,
                               device=self.device, dtype=self.dtype)

    def init_center(self) -> Tensor:
        """(N,) one freshly initialised network: the ``center_init`` for ES searchers."""
        return self.init_population(1)[0]

    def _fill(self, values: Tensor) -> None:
        # Searchers that call generate_batch() (GA, Cosyne, ...) start from real
        # networks, not from EvoTorch's default of near-zero vectors.
        values[:] = self.init_population(values.shape[0])

    def gene_groups(self, level: str) -> Tensor:
        """``(N,)`` int64 group ids of the solution vector at ``level``, on the problem's device.

        ``level``: ``"parameter"`` (each gene), ``"row"`` (a neuron's incoming weights +
        bias, an embedding/position row, a LayerNorm feature), ``"head"`` (a query
        head's query columns and output-projection rows), ``"expert"`` (an expert's
        matrices, biases and gate column), ``"tensor"`` or ``"layer"``; exact
        definitions in :mod:`evotorch_mqa_moe.genes`. For structure-aware cross-over:
        ``UniformCrossOver(problem, ..., granularity=level)``. Cached per level: the
        same tensor comes back each time (do not modify it).

        Raises:
            ValueError: unknown ``level`` (the message lists the choices).
        """
        cache = self.__dict__.setdefault("_gene_groups_cache", {})
        if not isinstance(level, str) or level not in cache:
            cache[level] = gene_groups(self.config, level, device=self.device)  # validates
        return cache[level]

    def population_model(self, values: Tensor) -> PopulationModel:
        """The callable a task receives: ``values`` (P, N) as one population."""
        values = torch.as_tensor(values)
        if values.dim() == 1:
            values = values.unsqueeze(0)
        if values.shape[-1] != num_parameters(self.config):
            raise ValueError(
                f"solutions have length {values.shape[-1]}, expected {self.solution_length}"
            )
        return PopulationModel(self.config, values.to(self.network_device),
                               chunk_size=self.chunk_size, memory_budget=self.memory_budget)

    # ------------------------------------------------------------ data stream
    def next_generation(self) -> None:
        """Start a new data epoch (with ``data_refresh="generation"``)."""
        self._data_epoch += 1

    def refresh_data_each_step(self, searcher: Any) -> None:
        """Give every step of ``searcher`` one fresh batch shared by all its evaluations."""
        self.data_refresh = "generation"
        searcher.before_step_hook.append(self.next_generation)

    def data_generator(self, epoch: int | None = None) -> torch.Generator:
        """The CPU generator the task draws data from in data epoch ``epoch``."""
        epoch = self._data_epoch if epoch is None else epoch
        state = np.random.SeedSequence([self._data_root, epoch]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def evaluate(self, x: Any) -> None:
        if self.is_main:
            self.evaluations += len(x) if isinstance(x, SolutionBatch) else 1
            # Decided once here, sent to Ray actors by _make_sync_data_for_actors,
            # so every piece of the batch sees the same data.
            self._data_seed = self._data_epoch
            if self.data_refresh == "evaluation":
                self._data_epoch += 1
        super().evaluate(x)

    def _make_sync_data_for_actors(self) -> Any:
        return {"data_seed": self._data_seed}

    def _use_sync_data_from_main(self, received: dict) -> None:
        self._data_seed = received["data_seed"]

    # ------------------------------------------------------------ evaluation
    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        epoch = 0 if self.data_refresh == "never" else self._data_seed
        fitness = self.task.fitness(self.population_model(batch.values),
                                    self.data_generator(epoch or 0))
        fitness = torch.as_tensor(fitness, dtype=self.eval_dtype).reshape(-1)
        if fitness.shape[0] != len(batch):
            raise ValueError(
                f"task {self.task.name!r} returned {fitness.shape[0]} fitness values "
                f"for {len(batch)} solutions"
            )
        fitness, bad = worst_for_nonfinite(fitness)
        if bad:
            logger.warning(f"{bad} of {len(batch)} individuals had NaN/inf fitness; "
                           "they were given the worst fitness")
        batch.set_evals(fitness.to(batch.device))

    def metrics(self, values: Tensor) -> dict[str, float | list[float]]:
        """Held-out metrics of one solution (N,) as floats, or of several (P, N) as lists."""
        values = torch.as_tensor(values)
        single = values.dim() == 1
        result = self.task.metrics(self.population_model(values))
        return {k: (float(v[0]) if single else [float(x) for x in v]) for k, v in result.items()}
