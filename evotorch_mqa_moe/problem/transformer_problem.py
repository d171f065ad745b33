"""`TransformerProblem`: a Task as an EvoTorch `NEProblem`, evaluated a population at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from evotorch import Solution, SolutionBatch
from evotorch.neuroevolution import NEProblem
from loguru import logger
from torch import Tensor, nn

from evotorch_mqa_moe._internal.evotorch_compat import actors_started, mapelites_building
from evotorch_mqa_moe._internal.validate import check_int
from evotorch_mqa_moe.model import (
    MQAMoETransformer,
    PopulationModel,
    TransformerConfig,
    gene_groups,
    init_parameters,
    num_parameters,
    resolve_dtype,
)

from .nonfinite import replace_nonfinite
from .task import Task

__all__ = ["TransformerProblem", "DATA_REFRESH"]

DATA_REFRESH = ("evaluation", "generation", "never")



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
        compute_dtype: the forward pass's dtype, ``"float32"`` (default) or
            ``"bfloat16"`` (``--dtype``): solutions, searcher state and fitness stay
            float32; each evaluation casts the population for the pass and the outputs
            back (:class:`~evotorch_mqa_moe.model.PopulationModel`). ``lowrank-es`` also
            keeps its factors in it. A device without bf16 arithmetic is a ``ValueError``.
        num_actors, num_gpus_per_actor, actor_config, num_subbatches, subbatch_size:
            EvoTorch's Ray parallelism; each actor evaluates its piece vectorised.
            With the same ``seed``, a run with actors is the same search as one
            without: starting the actors does not consume the problem's generator.

    Raises:
        ValueError: ``config`` cannot take the task's inputs or give its outputs:
            compared with ``task.default_config()``, it has the other kind of input
            (tokens / vectors), a smaller ``vocab_size``, another ``input_dim`` or a
            smaller ``output_dim`` (the message names both numbers).

    Fitness is maximised. Individuals whose fitness is NaN/inf get a finite value
    worse than every finite one (one warning per evaluation says how many).

    Every method that takes solutions (:meth:`metrics`, :meth:`population_model`,
    ``make_net``) accepts an EvoTorch ``Solution`` (e.g. ``searcher.status["pop_best"]``
    of a GA), a ``SolutionBatch`` (or a slice of one), a tensor ``(N,)`` / ``(P, N)``
    (e.g. ``searcher.status["center"]``) or anything ``torch.as_tensor`` converts.

    Data epochs: all individuals of one evaluation see the data of one epoch,
    :attr:`data_epoch`; :meth:`data_generator` gives that epoch's generator and
    :attr:`last_data_epoch` the epoch of the latest evaluation.

    Behaviour descriptors: the problem evaluates fitness only (``eval_data_length``
    0), so EvoTorch's ``MAPElites``, which sorts solutions into cells by extra
    evaluation data, is refused with a ``ValueError`` when it is constructed.
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
        compute_dtype: str | torch.dtype | None = None,
        num_actors: int | str | None = None,
        num_gpus_per_actor: int | float | str | None = None,
        actor_config: dict | None = None,
        num_subbatches: int | None = None,
        subbatch_size: int | None = None,
    ):
        for attr in ("fitness", "metrics", "default_config"):
            if not callable(getattr(task, attr, None)):
                raise TypeError(f"task must implement the Task protocol; it has no {attr}()")
        reference = task.default_config()
        if config is None:
            config = reference
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if isinstance(reference, TransformerConfig):
            _check_config_fits_task(config, reference, getattr(task, "name", type(task).__name__))
        if data_refresh not in DATA_REFRESH:
            raise ValueError(f"data_refresh must be one of {DATA_REFRESH}, got {data_refresh!r}")
        seed = check_int("seed", seed, 0, none_ok=True)
        chunk_size = check_int("chunk_size", chunk_size, none_ok=True)
        memory_budget = check_int("memory_budget", memory_budget, none_ok=True)
        if device is not None:
            try:  # compute there: a bad name, a missing GPU
                torch.ones(1, device=device).add(1)
            except Exception as exc:  # noqa: BLE001 - any failure: one clear line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ValueError(f"device {device!r} is not usable here: {first}") from None
        self.task = task
        self.config = config
        self.data_refresh = data_refresh
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.compute_dtype = resolve_dtype(compute_dtype, device)
        # The data stream is separate from the searcher's random numbers, so every
        # searcher run with the same seed sees the same sequence of batches.
        if seed is None:
            seed_bits = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        else:
            seed_bits = seed
        self._data_root = int(np.random.SeedSequence([seed_bits, 0xDA7A]).generate_state(1)[0])
        self._data_epoch = 0  # kept under this name: older code sets it directly
        self._eval_epoch: int | None = None  # the epoch of the evaluation in progress / last
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

    def _parallelize(self) -> None:
        # EvoTorch draws the actors' seeds from the problem's generator when it starts
        # them (at the first evaluation), which shifted every later draw (mutations,
        # samples) against a run without actors. Restore the generator's state, so
        # the same seed gives the same search with and without actors. (The actors'
        # own generators serve nothing here: data come from data_generator.)
        starting = (not actors_started(self) and self.is_main
                    and self.generator is not None)
        state = self.generator.get_state() if starting else None
        super()._parallelize()
        if state is not None:
            self.generator.set_state(state)

    def generate_batch(self, popsize: int | None = None, *, empty: bool = False,
                       center: Any = None, stdev: Any = None,
                       symmetric: bool = False) -> SolutionBatch:
        """EvoTorch's ``generate_batch``; refuses ``MAPElites`` (see the class docstring)."""
        building = mapelites_building()  # (MAPElites, descriptors) while one is built
        if building is not None and self.eval_data_length < building[1]:
            raise ValueError(
                f"MAPElites needs {building[1]} behaviour descriptors per "
                f"solution as evaluation data, but TransformerProblem evaluates fitness only "
                f"(eval_data_length={self.eval_data_length}); use another searcher "
                "(evotorch_mqa_moe.searchers lists the supported ones)"
            )
        return super().generate_batch(popsize, empty=empty, center=center, stdev=stdev,
                                      symmetric=symmetric)

    def set_initial_solution(self, values: Any, stdev: float = 0.0) -> None:
        """Start searchers from trained weights instead of a fresh initialisation.

        After this call :meth:`init_center` returns ``values`` exactly (the ES centre,
        ``adam``'s network) and :meth:`init_population` returns ``values`` as its first
        row and ``values + stdev * N(0, 1)`` (drawn with the problem's generator) as the
        others (a GA's or a hybrid's population around it). ``values=None`` goes back to
        fresh networks. ``values``: as :meth:`metrics` accepts, one solution.

        Raises:
            ValueError: not one solution of this problem's length, non-finite values, or
                a negative ``stdev``.
        """
        if values is None:
            self.__dict__.pop("_initial_solution", None)
            return
        values, single = self._as_values(values)
        if not single and values.shape[0] != 1:
            raise ValueError(f"the initial solution must be one solution (N,), got shape "
                             f"{tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the initial solution holds NaN/inf values")
        if not (isinstance(stdev, int | float) and stdev >= 0 and stdev < float("inf")):
            raise ValueError(f"stdev must be a finite number >= 0, got {stdev!r}")
        self._initial_solution = (values[0].detach().to(self.device, self.dtype).clone(),
                                  float(stdev))

    @property
    def initial_solution(self) -> Tensor | None:
        """The solution set by :meth:`set_initial_solution` (``None``: fresh networks)."""
        init = self.__dict__.get("_initial_solution")
        return None if init is None else init[0]

    def init_population(self, popsize: int) -> Tensor:
        """(popsize, N) freshly initialised networks, drawn with the problem's generator
        (or around the initial solution: :meth:`set_initial_solution`)."""
        init = self.__dict__.get("_initial_solution")
        if init is not None:
            values, stdev = init
            noise = torch.randn((popsize, values.shape[0]), generator=self.generator,
                                device=self.device, dtype=self.dtype)
            noise[0] = 0.0
            return values + stdev * noise
        return init_parameters(self.config, popsize, generator=self.generator,
                               device=self.device, dtype=self.dtype)

    def init_center(self) -> Tensor:
        """(N,) one freshly initialised network (or the initial solution): the
        ``center_init`` for ES searchers."""
        init = self.__dict__.get("_initial_solution")
        if init is not None:
            return init[0].clone()
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

    def _as_values(self, solutions: Any) -> tuple[Tensor, bool]:
        """``solutions`` as a plain ``(P, N)`` tensor, and whether it was one solution.

        Accepts a ``Solution``, a ``SolutionBatch`` (or a slice of one), a tensor
        ``(N,)`` or ``(P, N)``, or anything ``torch.as_tensor`` converts.
        """
        if isinstance(solutions, (Solution, SolutionBatch)):
            values = solutions.values
        elif isinstance(solutions, Tensor):
            values = solutions
        else:
            try:  # lists, arrays: in the problem's dtype, as make_net converts them
                values = torch.as_tensor(solutions, dtype=self.dtype)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    "solutions must be a Solution, a SolutionBatch or a tensor (N,) / (P, N), "
                    f"got {type(solutions).__name__}"
                ) from err
        values = values.as_subclass(Tensor)  # e.g. EvoTorch's ReadOnlyTensor
        single = values.dim() == 1
        if single:
            values = values.unsqueeze(0)
        if values.dim() != 2:
            raise ValueError(f"solutions must be (N,) or (P, N), got shape {tuple(values.shape)}")
        if values.shape[-1] != num_parameters(self.config):
            raise ValueError(
                f"solutions have length {values.shape[-1]}, expected {self.solution_length}"
            )
        if not values.is_floating_point():
            raise TypeError(f"solutions must be floating point, got dtype {values.dtype}")
        return values, single

    def population_model(self, solutions: Any) -> PopulationModel:
        """The callable a task receives: ``solutions`` (P, N) as one population.

        ``solutions``: a ``Solution``, ``SolutionBatch``, tensor ``(N,)`` / ``(P, N)``
        (see the class docstring); one solution is a population of one.
        """
        values, _ = self._as_values(solutions)
        return PopulationModel(self.config, values.to(self.network_device),
                               compute_dtype=self.compute_dtype,
                               chunk_size=self.chunk_size, memory_budget=self.memory_budget)

    # ------------------------------------------------------------ data stream
    @property
    def data_epoch(self) -> int:
        """The data epoch the next evaluation draws its data from (a non-negative int).

        Advanced by every evaluation (``data_refresh="evaluation"``) or by
        :meth:`next_generation`; set it to replay or resume a data stream (a
        checkpoint stores it). ``problem._data_epoch`` is the same number (deprecated).
        """
        return self._data_epoch

    @data_epoch.setter
    def data_epoch(self, epoch: int) -> None:
        self._data_epoch = check_int("data_epoch", epoch, 0)

    @property
    def data_root(self) -> int:
        """The root of the data stream: batch ``k`` is drawn from ``(data_root, k)``.

        Derived from the problem's ``seed``; a checkpoint stores it so that a
        searcher resumed on a problem built with another seed continues the same
        stream (a non-negative int).
        """
        return self._data_root

    @data_root.setter
    def data_root(self, root: int) -> None:
        self._data_root = check_int("data_root", root, 0)

    @property
    def last_data_epoch(self) -> int | None:
        """The data epoch of the latest evaluation (``None`` before the first).

        ``data_generator(problem.last_data_epoch)`` redraws the data that
        evaluation saw (with ``data_refresh="never"`` every evaluation uses epoch 0).
        """
        if self._eval_epoch is None:
            return None
        return 0 if self.data_refresh == "never" else self._eval_epoch

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
            self._eval_epoch = self._data_epoch
            if self.data_refresh == "evaluation":
                self._data_epoch += 1
        super().evaluate(x)

    def _make_sync_data_for_actors(self) -> Any:
        return {"eval_epoch": self._eval_epoch}

    def _use_sync_data_from_main(self, received: dict) -> None:
        self._eval_epoch = received["eval_epoch"]

    # ------------------------------------------------------------ evaluation
    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        epoch = 0 if self.data_refresh == "never" else self._eval_epoch
        fitness = self.task.fitness(self.population_model(batch.values),
                                    self.data_generator(epoch or 0))
        fitness = torch.as_tensor(fitness, dtype=self.eval_dtype).reshape(-1)
        if fitness.shape[0] != len(batch):
            raise ValueError(
                f"task {self.task.name!r} returned {fitness.shape[0]} fitness values "
                f"for {len(batch)} solutions"
            )
        fitness, bad = replace_nonfinite(fitness)
        batch.set_evals(fitness.to(batch.device))
        bad = int(bad)  # the one read-back of an evaluation, after its whole pass
        if bad:
            logger.warning(f"{bad} of {len(batch)} individuals had NaN/inf fitness; "
                           "they were given the worst fitness")

    def metrics(self, solutions: Any) -> dict[str, float | list[float]]:
        """Held-out metrics (``task.metrics``) of one solution as floats, or of several as lists.

        ``solutions``: one ``Solution`` or tensor ``(N,)`` -> ``{name: float}``; a
        ``SolutionBatch`` or tensor ``(P, N)`` -> ``{name: [P floats]}``. A solution
        holding NaN/inf gets NaN for every metric.
        """
        values, single = self._as_values(solutions)
        result = self.task.metrics(self.population_model(values))
        # a network with NaN/inf weights has no meaningful score (its argmax is arbitrary)
        finite = torch.isfinite(values).all(dim=1).tolist()
        nan = float("nan")
        return {k: (float(v[0]) if finite[0] else nan) if single else
                [float(x) if ok else nan for x, ok in zip(v, finite, strict=True)]
                for k, v in result.items()}

    def make_net(self, parameters: Any) -> nn.Module:
        """The network of one solution (a ``Solution`` or ``(N,)`` values); ValueError
        naming the length when it is not :attr:`solution_length`."""
        if not isinstance(parameters, Solution):
            values = torch.as_tensor(parameters)
            if values.dim() != 1 or values.shape[0] != self.solution_length:
                raise ValueError(f"make_net takes one solution of length "
                                 f"{self.solution_length}, got shape {tuple(values.shape)}")
        return super().make_net(parameters)


def _check_config_fits_task(config: TransformerConfig, reference: TransformerConfig,
                            task_name: str) -> None:
    """Refuse a ``config`` that cannot take the inputs or give the outputs the task's own
    ``default_config()`` (``reference``) is sized for, instead of failing at the first
    evaluation."""
    where = f"task {task_name!r} (its default_config)"
    if config.token_inputs != reference.token_inputs:
        kind = "tokens" if reference.token_inputs else "vectors"
        raise ValueError(
            f"{where} takes {kind} (vocab_size={reference.vocab_size}, "
            f"input_dim={reference.input_dim}), but the config has "
            f"vocab_size={config.vocab_size}, input_dim={config.input_dim}"
        )
    if config.token_inputs and config.vocab_size < reference.vocab_size:
        raise ValueError(
            f"config vocab_size={config.vocab_size} is smaller than the vocab_size="
            f"{reference.vocab_size} of {where}: its token ids would be out of range"
        )
    if not config.token_inputs and config.input_dim != reference.input_dim:
        raise ValueError(
            f"config input_dim={config.input_dim} differs from the input_dim="
            f"{reference.input_dim} of {where}"
        )
    if config.output_dim < reference.output_dim:
        raise ValueError(
            f"config output_dim={config.output_dim} is smaller than the output_dim="
            f"{reference.output_dim} of {where}"
        )
