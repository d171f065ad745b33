"""Tests of the ``cartpole`` problem (CartPole-v1 with hidden velocities)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evotorch_mqa_moe.model import MQAMoETransformer, PopulationModel, check_inputs, num_parameters
from evotorch_mqa_moe.problem import Task
from evotorch_mqa_moe.problems.cartpole import (
    TIME_STEP,
    TRAIN_SEED_SPACE,
    CartPoleTask,
    start_states,
)

gym = pytest.importorskip("gymnasium")


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny forwards: one thread avoids OpenMP oversubscription on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_population(config, popsize: int, seed: int = 0) -> PopulationModel:
    """P independently initialised networks as one PopulationModel."""
    torch.manual_seed(seed)
    rows = [torch.nn.utils.parameters_to_vector(MQAMoETransformer(config).parameters())
            for _ in range(popsize)]
    return PopulationModel(config, torch.stack(rows).detach())


class PDController:
    """A hand-written policy with PopulationModel's call interface.

    It undoes the task's scaling, estimates cart and pole velocities from the
    last two observations (finite differences over CartPole's 0.02 s step) and
    pushes right when ``k_x x + k_xd x' + k_th theta + k_thd theta' > 0``.
    ``(P, E, W, 2)`` windows -> ``(P, E, 2)`` logits (left, right).
    """

    def __init__(self, task: CartPoleTask, gains=(0.1, 0.5, 10.0, 2.0), popsize: int = 1):
        self.task, self.gains, self.popsize = task, gains, popsize
        self.config = task.default_config()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[torch.Tensor] = []

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        self.calls.append(windows.clone())
        scale = torch.as_tensor(self.task.obs_scale, dtype=windows.dtype)
        prev, last = windows[..., -2, :] * scale, windows[..., -1, :] * scale  # (P, E, 2)
        vel = (last - prev) / TIME_STEP
        k_x, k_xd, k_th, k_thd = self.gains
        u = k_x * last[..., 0] + k_xd * vel[..., 0] + k_th * last[..., 1] + k_thd * vel[..., 1]
        return torch.stack((-u, u), dim=-1)


class RandomPolicy:
    """Uniformly random actions from a seeded generator: (P, E, W, I) -> (P, E, 2)."""

    def __init__(self, popsize: int = 1, seed: int = 0):
        self.popsize, self.device, self.dtype = popsize, torch.device("cpu"), torch.float32
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.rand(*windows.shape[:2], 2, generator=self.generator)


# ---------------------------------------------------------------- options


def test_is_a_task_with_small_default_config():
    task = CartPoleTask()
    assert isinstance(task, Task)
    assert task.name == "cartpole" and task.target_metric == "mean_return"
    c = task.default_config()
    assert c.input_dim == 2 and c.output_dim == 2 and c.max_seq_len == 8
    assert c.pooling == "last"
    assert 2000 <= num_parameters(c) <= 4000
    full = CartPoleTask(hide_velocity=False, window=3)
    assert full.default_config().input_dim == 4 and full.default_config().max_seq_len == 3


@pytest.mark.parametrize(
    "option, value",
    [("window", 0), ("window", 2.5), ("window", True), ("episodes", 0), ("episodes", -3),
     ("max_steps", 0), ("max_steps", "500"), ("test_episodes", 0), ("test_seed", -1),
     ("test_seed", 1.0), ("hide_velocity", 1), ("normalize", "yes")],
)
def test_bad_options_raise_naming_option_and_value(option, value):
    with pytest.raises(ValueError, match=rf"{option}.*{value!r}".replace("(", r"\(")):
        CartPoleTask(**{option: value})


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError):
        CartPoleTask(windw=8)


# ---------------------------------------------------------------- inputs


def test_start_states_match_gymnasium_reset():
    seeds = [0, 7, 123456, TRAIN_SEED_SPACE + 3]
    env = gym.make("CartPole-v1")
    for seed, state in zip(seeds, start_states(seeds), strict=True):
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, state.astype(np.float32))


def test_inputs_are_valid_windows_without_velocity():
    task = CartPoleTask(window=5, episodes=3, max_steps=30)
    policy = PDController(task, popsize=2)
    seeds = task.episode_seeds(torch.Generator().manual_seed(0))
    task.rollout(policy, seeds)
    first = policy.calls[0]
    assert first.shape == (2, 3, 5, 2) and first.dtype == torch.float32
    for windows in policy.calls:
        check_inputs(task.default_config(), windows, popsize=2)  # raises if invalid
    # step 0: every frame is the first observation (x, theta), scaled; no velocities
    expected = start_states(seeds).astype(np.float32)[:, [0, 2]] / task.obs_scale
    for p in range(2):
        for t in range(5):
            np.testing.assert_allclose(first[p, :, t].numpy(), expected, rtol=1e-6)
    # later windows shift by one step: the newest frame moves one slot left
    assert len(policy.calls) == 30
    for before, after in zip(policy.calls, policy.calls[1:], strict=False):
        assert torch.equal(after[..., :-1, :], before[..., 1:, :])


def test_default_config_population_runs():
    task = CartPoleTask(episodes=2, max_steps=20, test_episodes=3)
    model = random_population(task.default_config(), popsize=3)
    fit = task.fitness(model, torch.Generator().manual_seed(0))
    assert fit.shape == (3,) and fit.dtype == torch.float32
    assert ((fit >= 1) & (fit <= 20)).all()
    metrics = task.metrics(model)
    assert set(metrics) == {"mean_return"} and metrics["mean_return"].shape == (3,)


def test_seeds_come_from_generator_and_test_seeds_are_disjoint():
    task = CartPoleTask(episodes=6, test_episodes=10, test_seed=5)
    a = task.episode_seeds(torch.Generator().manual_seed(1))
    b = task.episode_seeds(torch.Generator().manual_seed(1))
    c = task.episode_seeds(torch.Generator().manual_seed(2))
    assert a == b and a != c and len(a) == 6
    assert all(0 <= s < TRAIN_SEED_SPACE for s in a + c)
    assert task.test_seeds() == list(range(TRAIN_SEED_SPACE + 5, TRAIN_SEED_SPACE + 15))


# ------------------------------------------------------------ determinism


def test_seeded_task_repeats_exactly():
    task = CartPoleTask(episodes=3, max_steps=100, test_episodes=4)
    model = random_population(task.default_config(), popsize=4, seed=3)
    f1 = task.fitness(model, torch.Generator().manual_seed(11))
    f2 = task.fitness(model, torch.Generator().manual_seed(11))
    assert torch.equal(f1, f2)
    assert torch.equal(task.metrics(model)["mean_return"], task.metrics(model)["mean_return"])
    pd = PDController(task)
    g = torch.Generator().manual_seed(4)
    first = task.fitness(pd, g)
    assert torch.equal(first, task.fitness(pd, torch.Generator().manual_seed(4)))


def test_population_rollout_equals_each_policy_alone():
    task = CartPoleTask(episodes=4, max_steps=200)
    config = task.default_config()
    model = random_population(config, popsize=5, seed=1)
    seeds = task.episode_seeds(torch.Generator().manual_seed(7))
    together = task.rollout(model, seeds)  # (5, 4)
    assert together.shape == (5, 4)
    assert together.std() > 0  # the individuals really differ
    for p in range(5):
        alone = task.rollout(PopulationModel(config, model.params[p : p + 1]), seeds)
        assert torch.equal(alone[0], together[p]), p
    # and through fitness with the same generator state
    fit = task.fitness(model, torch.Generator().manual_seed(7))
    for p in range(5):
        one = PopulationModel(config, model.params[p : p + 1])
        assert torch.equal(task.fitness(one, torch.Generator().manual_seed(7)), fit[p : p + 1])


def test_returns_match_single_gymnasium_env():
    """The vectorised rollout scores an episode exactly as gym.make('CartPole-v1') does."""
    task = CartPoleTask(window=2, max_steps=500)
    # weak gains: episodes of different, intermediate lengths
    policy = PDController(task, gains=(0.0, 0.0, 1.0, 0.02))
    seeds = [3, 14, 15]
    vectorised = task.rollout(policy, seeds)[0]
    env = gym.make("CartPole-v1", max_episode_steps=task.max_steps)
    for seed, expected in zip(seeds, vectorised.tolist(), strict=True):
        obs, _ = env.reset(seed=seed)
        history = [obs, obs]
        total, done = 0.0, False
        while not done:
            window = np.stack(history[-2:])[:, [0, 2]] / task.obs_scale
            logits = policy(torch.as_tensor(window, dtype=torch.float32).view(1, 1, 2, 2))
            obs, reward, terminated, truncated, _ = env.step(int(logits.argmax(-1)))
            total += reward
            done = terminated or truncated
            history.append(obs)
        assert total == expected, seed
    assert len(set(vectorised.tolist())) > 1


# ------------------------------------------------------------ baselines


def test_pd_controller_from_finite_differences_beats_random():
    task = CartPoleTask(test_episodes=20)
    pd = task.metrics(PDController(task))["mean_return"]
    rand = task.metrics(RandomPolicy())["mean_return"]
    assert pd.item() >= 200, pd
    assert rand.item() <= 50, rand
    # without the velocity estimates (angle alone) the same controller does far worse
    no_velocity = task.metrics(PDController(task, gains=(0.0, 0.0, 10.0, 0.0)))["mean_return"]
    assert no_velocity.item() < pd.item()


def test_max_steps_caps_return():
    task = CartPoleTask(max_steps=50, test_episodes=5)
    assert torch.equal(task.metrics(PDController(task))["mean_return"], torch.tensor([50.0]))


def test_full_observation_variant():
    task = CartPoleTask(hide_velocity=False, episodes=2, max_steps=20)
    model = random_population(task.default_config(), popsize=2)
    assert task.fitness(model, torch.Generator().manual_seed(0)).shape == (2,)


def test_wrong_policy_output_is_reported():
    task = CartPoleTask(max_steps=5)

    class Bad(RandomPolicy):
        def __call__(self, windows):
            return torch.zeros(*windows.shape[:2], 3)

    with pytest.raises(ValueError, match="action logits"):
        task.fitness(Bad(), torch.Generator().manual_seed(0))


def test_unpooled_config_acts_on_last_position():
    task = CartPoleTask(episodes=2, max_steps=15)
    config = task.default_config().replace(pooling=None, causal=True)
    model = random_population(config, popsize=2)
    seeds = [1, 2]
    returns = task.rollout(model, seeds)
    pooled = random_population(task.default_config().replace(causal=True), popsize=2)
    # same weights (the pooling has no parameters): the last position's logits
    assert torch.equal(returns, task.rollout(pooled, seeds))
