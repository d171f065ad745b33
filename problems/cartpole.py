"""``cartpole``: balance gymnasium's CartPole-v1 from positions alone.

The cart and pole velocities are hidden, so a policy has to infer them from
its recent observations: the transformer reads a window of the last ``window``
observations ``(cart position, pole angle)`` and its pooled output at the last
position gives two action logits (push left, push right). The action is the
argmax, so a policy is deterministic and an episode's return depends only on
the weights and the episode's seed.

All ``P`` individuals x ``E`` episodes run as ``P * E`` environments of
gymnasium's numpy-vectorised :class:`CartPoleVectorEnv`: one ``env.step`` and
one population forward per time step advance every episode of every
individual. Episode ``j`` starts from the same state for every individual
(common random numbers), the state ``gym.make("CartPole-v1").reset(seed=s_j)``
would give, so a policy's returns do not depend on who else is in the batch.

Shapes: ``P`` population, ``E`` episodes, ``W`` window, ``I`` observation
width (2 with velocities hidden, 4 without).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from evotorch_mqa_moe._internal.validate import check_bool, check_int
from evotorch_mqa_moe.model import PopulationModel, TransformerConfig

__all__ = ["CartPoleTask", "start_states"]

#: Seeds for training episodes are drawn from ``[0, TRAIN_SEED_SPACE)``; held-out
#: episodes use ``TRAIN_SEED_SPACE + test_seed + i``, so the two never overlap.
TRAIN_SEED_SPACE = 2**31

#: Typical magnitudes of (x, x_dot, theta, theta_dot) while the pole is balanced:
#: a tenth of the termination thresholds for positions (x 2.4, theta 12 degrees)
#: and of rough velocity ranges. Scaling by the thresholds themselves left the
#: inputs ~0.02 at an episode's start, too small to move an initial network's
#: output, so most initial policies always pushed one way.
OBS_RANGE = (0.24, 0.2, 1.2 * 2 * math.pi / 360, 0.3)

#: Observation columns the policy sees with velocities hidden: x and theta.
POSITION_COLUMNS = (0, 2)

TIME_STEP = 0.02  # CartPole's tau, seconds between observations


def start_states(seeds: list[int] | np.ndarray) -> np.ndarray:
    """(len(seeds), 4) float64 start states, one per seed.

    Row ``j`` is the state ``gym.make("CartPole-v1").reset(seed=seeds[j])`` starts
    from (uniform in [-0.05, 0.05]^4 from gymnasium's seeded generator).
    """
    from gymnasium.utils import seeding

    rows = [seeding.np_random(int(s))[0].uniform(-0.05, 0.05, size=(4,)) for s in seeds]
    return np.stack(rows) if rows else np.zeros((0, 4))


class CartPoleTask:
    """CartPole-v1 with hidden velocities, policies reading an observation window.

    Args:
        window: observations the policy sees, ``W`` (the newest last); at the start
            of an episode the window is filled with copies of the first observation.
        episodes: episodes per individual per :meth:`fitness` call, ``E``.
        max_steps: episode length limit (CartPole-v1's is 500); the best return.
        test_episodes: fresh episodes for the held-out :meth:`metrics`.
        test_seed: offset of the held-out episode seeds; they are
            ``2**31 + test_seed + i`` while training seeds lie below ``2**31``.
        hide_velocity: feed only (cart position, pole angle); ``False`` gives the
            full 4-dimensional observation (the ordinary, easier task).
        normalize: divide observations by :data:`OBS_RANGE` so they are O(1) while balancing.

    Attributes:
        name: ``"cartpole"``.
        target_metric: ``"mean_return"`` (chance ~22, ceiling ``max_steps``).
        obs_dim: ``I``, 2 with velocities hidden, else 4.
        obs_scale: (I,) float64 divisor applied to the raw observation columns.
    """

    name = "cartpole"
    target_metric = "mean_return"

    def __init__(self, *, window: int = 8, episodes: int = 4, max_steps: int = 500,
                 test_episodes: int = 100, test_seed: int = 0, hide_velocity: bool = True,
                 normalize: bool = True):
        self.window = check_int("window", window)
        self.episodes = check_int("episodes", episodes)
        self.max_steps = check_int("max_steps", max_steps)
        self.test_episodes = check_int("test_episodes", test_episodes)
        self.test_seed = check_int("test_seed", test_seed, 0)
        self.hide_velocity = check_bool("hide_velocity", hide_velocity)
        self.normalize = check_bool("normalize", normalize)
        self.columns = POSITION_COLUMNS if hide_velocity else (0, 1, 2, 3)
        self.obs_dim = len(self.columns)
        self.obs_scale = (np.array([OBS_RANGE[c] for c in self.columns]) if normalize
                          else np.ones(self.obs_dim))

    def __repr__(self) -> str:
        return (f"CartPoleTask(window={self.window}, episodes={self.episodes}, "
                f"max_steps={self.max_steps}, test_episodes={self.test_episodes}, "
                f"test_seed={self.test_seed}, hide_velocity={self.hide_velocity}, "
                f"normalize={self.normalize})")

    def default_config(self) -> TransformerConfig:
        """A ~3k-parameter policy: embed 16, 1 layer, 2 heads (MQA), 2 experts of 32."""
        return TransformerConfig(
            input_dim=self.obs_dim, output_dim=2, embed_dim=16, num_layers=1, num_heads=2,
            num_kv_heads=1, expert_dim=32, num_experts=2, max_seq_len=self.window,
            # Learned positions: with the fixed sinusoidal code, whose last-position
            # vector is the same for every input, many initial policies ignored the
            # (small) observations and always pushed one way, so every individual
            # scored ~9 and PGPE had no signal (3 of 4 seeds; learned: 4 of 4 solved).
            pooling="last", causal=False, positional="learned",
        )

    # ------------------------------------------------------------------ seeds
    def episode_seeds(self, generator: torch.Generator) -> list[int]:
        """``episodes`` training seeds in ``[0, 2**31)`` drawn from ``generator``."""
        draw = torch.randint(0, TRAIN_SEED_SPACE, (self.episodes,), generator=generator,
                             dtype=torch.int64)
        return draw.tolist()

    def test_seeds(self) -> list[int]:
        """The fixed held-out seeds, disjoint from every training seed."""
        base = TRAIN_SEED_SPACE + self.test_seed
        return list(range(base, base + self.test_episodes))

    # ---------------------------------------------------------------- rollout
    def observe(self, obs: np.ndarray) -> np.ndarray:
        """Raw observations (..., 4) -> policy inputs (..., I): columns kept, scaled."""
        return obs[..., list(self.columns)] / self.obs_scale

    def rollout(self, model: PopulationModel, seeds: list[int]) -> Tensor:
        """(P, len(seeds)) float32 returns of every individual on every seeded episode.

        ``model`` maps windows (P, E, W, I) to action logits (P, E, 2) (or
        (P, E, W, 2), whose last position is used). An episode's return is the
        number of steps until it first terminates or is truncated at
        ``max_steps``; after that the environment's autoreset is ignored.
        Returns are on the CPU.
        """
        from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

        P, E, W = model.popsize, len(seeds), self.window
        if E == 0:
            raise ValueError("seeds must not be empty")
        n = P * E  # environment p * E + j = individual p, episode j
        env = CartPoleVectorEnv(num_envs=n, max_episode_steps=self.max_steps)
        env.reset(seed=0)
        start = np.tile(start_states(seeds), (P, 1))  # (n, 4)
        env.state = np.ascontiguousarray(start.T)  # the env keeps (4, n) float64
        device, dtype = model.device, model.dtype

        def inputs(obs: np.ndarray) -> Tensor:  # (n, 4) -> (P, E, 1, I)
            frame = self.observe(obs.astype(np.float32).astype(np.float64))
            return torch.from_numpy(frame).to(device=device, dtype=dtype).view(P, E, 1, -1)

        buf = inputs(start).expand(P, E, W, self.obs_dim).contiguous()  # (P, E, W, I)
        returns = np.zeros(n, dtype=np.float64)
        done = np.zeros(n, dtype=bool)
        actions = np.zeros(n, dtype=np.int64)
        try:
            for _ in range(self.max_steps):
                live = ~done.reshape(P, E).all(axis=0)  # (E,) episodes someone still plays
                with torch.no_grad():
                    if live.all():
                        logits = self._logits(model, buf, P, E)
                    else:
                        cols = torch.from_numpy(np.flatnonzero(live)).to(device)
                        logits = torch.zeros(P, E, 2, device=device, dtype=dtype)
                        logits[:, cols] = self._logits(model, buf[:, cols], P, len(cols))
                actions[:] = logits.argmax(dim=-1).reshape(n).cpu().numpy()
                obs, reward, terminated, truncated, _ = env.step(actions)
                returns += np.where(done, 0.0, reward)
                done |= terminated | truncated
                if done.all():
                    break
                buf = torch.cat((buf[:, :, 1:], inputs(obs)), dim=2)
        finally:
            env.close()
        return torch.from_numpy(returns.reshape(P, E)).float()

    @staticmethod
    def _logits(model: PopulationModel, windows: Tensor, P: int, E: int) -> Tensor:
        out = model(windows)
        if out.dim() == 4:  # unpooled (P, E, W, 2): act on the newest position
            out = out[:, :, -1]
        if tuple(out.shape) != (P, E, 2):
            raise ValueError(
                f"the policy must return (P, E, 2) action logits, got shape {tuple(out.shape)}"
            )
        return out

    def sensitivity_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(batch_size, W, I) float32 observation windows like those a policy reads.

        Typical inputs for safe mutation, which measures how the policy's outputs
        (not its returns) react to each weight. Window ``b`` ends a short episode of
        random pushes from a start state seeded from ``generator``, after a uniform
        number of steps in ``[0, 2W)`` or at the last observation before the episode
        ends, whichever comes first; positions before the start repeat the first
        observation, as in :meth:`rollout`. The same generator state gives the same windows.
        """
        from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

        n, W = check_int("batch_size", batch_size), self.window
        seeds = torch.randint(0, TRAIN_SEED_SPACE, (n,), generator=generator, dtype=torch.int64)
        ends = torch.randint(0, 2 * W, (n,), generator=generator).numpy()
        steps = int(ends.max())
        pushes = torch.randint(0, 2, (max(steps, 1), n), generator=generator).numpy()
        start = start_states(seeds.tolist())  # (n, 4)
        frames = np.empty((W + steps, n, 4))  # frame f of env b at [W - 1 + f, b]
        frames[:W] = start
        env = CartPoleVectorEnv(num_envs=n, max_episode_steps=self.max_steps)
        env.reset(seed=0)
        env.state = np.ascontiguousarray(start.T)
        alive = np.ones(n, dtype=bool)
        try:
            for i in range(steps):
                obs, _, terminated, truncated, _ = env.step(pushes[i])
                stop = alive & (terminated | truncated)  # frame i + 1 is never seen
                ends = np.where(stop, np.minimum(ends, i), ends)
                alive &= ~stop
                frames[W + i] = np.where(alive[:, None], obs, frames[W - 1 + i])
        finally:
            env.close()
        rows = ends[None, :] + np.arange(W)[:, None]  # (W, n): the window's frames
        windows = frames[rows, np.arange(n)[None, :]].transpose(1, 0, 2)  # (n, W, 4)
        windows = self.observe(windows.astype(np.float32).astype(np.float64))
        return torch.from_numpy(np.ascontiguousarray(windows)).float()

    # ------------------------------------------------------------- Task API
    def fitness(self, model: PopulationModel, generator: torch.Generator) -> Tensor:
        """(P,) mean return over ``episodes`` episodes seeded from ``generator``.

        Every individual plays the same episodes (common random numbers).
        """
        returns = self.rollout(model, self.episode_seeds(generator))
        return returns.mean(dim=1).to(model.device)

    def metrics(self, model: PopulationModel) -> dict[str, Tensor]:
        """``{"mean_return": (P,)}`` over ``test_episodes`` fixed held-out episodes."""
        returns = self.rollout(model, self.test_seeds())
        return {"mean_return": returns.mean(dim=1).to(model.device)}
