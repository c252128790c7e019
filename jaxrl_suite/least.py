"""LEAST (learn to stop): early stopping of unproductive episodes for off-policy agents.

Liu, Obando-Ceron, Castro, Courville, Pan (2025), "The Courage to Stop: Overcoming Sunk Cost
Fallacy in Deep Reinforcement Learning", arXiv 2506.13672 (ICML 2025). No official code.

**Source caveat.** The paper's method section could not be retrieved from this project's
sources (only its abstract and introduction were readable), so the equation numbers of the
paper are not cited below and every rule marked *Decision* is this implementation's choice,
built on what the abstract, the issue text and the public reviews state: a Q memory ``B_Q``
of the last ``K`` episodes, its per-step median ``eps_i`` as the stop baseline, a TD-loss
memory ``B_G`` as the "learning potential" that weights the threshold, ``K`` adapted with
the policy entropy, a warm-up without stopping, and stopped episodes treated as truncations.

The pieces (equation labels are this module's own, (L1)-(L7)):

* **Memories** (:class:`Memory`): ``B_Q, B_G in R^{K_max x L}`` (``L`` = the time limit),
  row ``r`` holding ``Q(s_i, a_i)`` and the TD loss ``delta_i^2`` of every step ``i`` of one
  finished episode, a ring over episodes (the oldest row is overwritten), ``length[r]`` the
  number of its steps. With an adaptive ``K <= K_max`` only the ``K`` most recent rows are
  *valid* (L1)::

      valid[r, i] = (age(r) < min(K, count)) and (i < length[r]),
      age(r) = (position - 1 - r) mod K_max

  so the arrays keep a fixed shape inside ``jit`` while ``K`` changes.
* **Per-step medians** (L2): ``eps_i = median{ B_Q[r, i] : valid[r, i] }`` and
  ``g_i = median{ B_G[r, i] : valid[r, i] }`` (NaN when no episode reached step ``i``).
* **Weights** (L3), *Decision*: ``omega_i = 1 + c (gbar - g_i) / (gbar + g_i)`` with
  ``gbar`` the mean TD loss over all valid entries and ``c = omega_scale in [0, 1]``, so
  ``omega_i in (1 - c, 1 + c)``; a step whose TD loss is above the average (the critic still
  has something to learn there: high learning potential) gets ``omega_i < 1``, a lower
  threshold, and is stopped less readily; a well-fitted step gets a stricter one.
* **Threshold** (L4), *Decision*: ``tau_i = eps_i + (omega_i - 1) |eps_i|``, which is the
  weighted median ``omega_i eps_i`` for ``eps_i >= 0`` (the Q values of the MuJoCo tasks) and
  moves the threshold in the same direction when ``eps_i < 0``.
* **Stop decision** (L5): an episode at step ``i`` with estimate ``q = min_j Q_j(s_i, a_i)``
  is stopped when, after warm-up and with at least ``K_min`` valid episodes at step ``i``,
  ``q < tau_i`` has held for ``patience`` consecutive steps. *Decision*: ``patience = 1`` is
  the plain rule, but with random initial states it stops about half of all episodes at their
  very first step (the initial state's Q is below the step-0 median half the time): on gymnax
  Pendulum with ``patience = 1``, 23 of 33 episodes were stopped, every one at step 0. The
  default ``patience = 10`` asks for a *sustained* shortfall, which is what "stuck in a
  suboptimal trajectory" means, and makes ``patience - 1`` the earliest stop step.
* **Adaptive K** (L6), *Decision*: with ``h`` the policy entropy per action dimension,
  ``K = round(K_min + (K_max - K_min) clip((h - h_low) / (h_high - h_low), 0, 1))``: a
  high-entropy (exploring, noisy) policy compares against more episodes, a sharp one against
  the recent episodes of nearly the same policy.
* **Warm-up** (L7): no stop while fewer than ``warmup_steps`` environment steps are done.

A stopped episode is a *truncation*: the agent stores ``terminated = 0`` and the step's own
next observation, so its target bootstraps (``y = r + gamma Q(s')``), and the environment is
reset (:func:`jaxrl_suite.agents.sac.stop_episodes`). Everything is a pure function of arrays,
usable under ``jit`` and ``vmap`` over seeds; :class:`Least` is the hook the agents call at
every environment step (``SAC(config, env, early_stop=Least(...))``).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import struct

from trainkit.config import Config, field

# --- memories ---------------------------------------------------------------------------------


@struct.dataclass
class Memory:
    """``B_Q`` and ``B_G`` (``[K_max, L]``), episode lengths ``[K_max]`` (0: empty row), the next
    row to write and the number of episodes stored (``<= K_max``)."""
    q: jax.Array
    g: jax.Array
    length: jax.Array
    position: jax.Array
    count: jax.Array

    @property
    def k_max(self) -> int:
        return int(self.q.shape[0])


def init_memory(k_max: int, max_steps: int) -> Memory:
    """Empty memories for ``k_max`` episodes of at most ``max_steps`` steps."""
    if k_max < 1 or max_steps < 1:
        raise ValueError(f"k_max and max_steps must be >= 1, got {k_max}, {max_steps}")
    zeros = jnp.zeros((k_max, max_steps), jnp.float32)
    return Memory(q=zeros, g=zeros, length=jnp.zeros((k_max,), jnp.int32),
                  position=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def write_episodes(memory: Memory, q_rows: jax.Array, g_rows: jax.Array, lengths: jax.Array,
                   ended: jax.Array) -> Memory:
    """Store the episodes of the environments with ``ended`` (rows ``[N, L]``, ``lengths [N]``),
    in environment order, at rows ``position, position + 1, ...`` (mod ``K_max``): a ring
    over episodes. ``N <= K_max`` (more episodes than rows in one step would collide)."""
    chex.assert_rank([q_rows, g_rows], 2)
    n = q_rows.shape[0]
    if n > memory.k_max:
        raise ValueError(f"{n} environments can end episodes at once but the memory holds "
                         f"K_max = {memory.k_max}: K_max must be >= num_envs")
    ended = ended.astype(bool)
    rank = jnp.cumsum(ended.astype(jnp.int32)) - 1
    rows = jnp.where(ended, (memory.position + rank) % memory.k_max, memory.k_max)  # out: dropped
    n_new = jnp.sum(ended.astype(jnp.int32))
    return Memory(q=memory.q.at[rows].set(q_rows.astype(jnp.float32), mode="drop"),
                  g=memory.g.at[rows].set(g_rows.astype(jnp.float32), mode="drop"),
                  length=memory.length.at[rows].set(lengths.astype(jnp.int32), mode="drop"),
                  position=(memory.position + n_new) % memory.k_max,
                  count=jnp.minimum(memory.count + n_new, memory.k_max))


def valid_rows(memory: Memory, k: jax.Array | int) -> jax.Array:
    """``[K_max]`` bool: the ``min(k, count)`` most recently written rows (L1)."""
    age = (memory.position - 1 - jnp.arange(memory.k_max)) % memory.k_max
    return age < jnp.minimum(jnp.asarray(k, jnp.int32), memory.count)


def valid_mask(memory: Memory, k: jax.Array | int, steps: jax.Array | None = None) -> jax.Array:
    """``valid[r, i]`` of (L1), ``[K_max, L]``, or ``[K_max, N]`` at step indices ``steps``."""
    cols = jnp.arange(memory.q.shape[1]) if steps is None else steps
    return valid_rows(memory, k)[:, None] & (cols[None, :] < memory.length[:, None])


def masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Median over axis 0 of the entries where ``mask`` (numpy's convention: the mean of the two
    middle values for an even count); NaN where a column has no valid entry."""
    chex.assert_equal_shape([values, mask])
    return jnp.nanmedian(jnp.where(mask, values, jnp.nan), axis=0)


def step_medians(memory: Memory, k: jax.Array | int, steps: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(L2) ``(eps, g, n_valid)``: the medians of ``B_Q`` and ``B_G`` over the valid episodes
    and their number, at every step (``[L]``) or at the step indices ``steps`` (``[N]``)."""
    mask = valid_mask(memory, k, steps)
    q = memory.q if steps is None else memory.q[:, steps]
    g = memory.g if steps is None else memory.g[:, steps]
    return masked_median(q, mask), masked_median(g, mask), jnp.sum(mask, axis=0)


def mean_td_loss(memory: Memory, k: jax.Array | int) -> jax.Array:
    """``gbar``: the mean of ``B_G`` over all valid entries (0 when there are none)."""
    mask = valid_mask(memory, k)
    return jnp.sum(jnp.where(mask, memory.g, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def omega(g_step: jax.Array, g_bar: jax.Array, scale: float) -> jax.Array:
    """(L3) ``omega_i = 1 + c (gbar - g_i) / (gbar + g_i)`` in ``(1 - c, 1 + c)``; 1 where
    ``gbar + g_i = 0`` (no TD loss anywhere: no information)."""
    den = g_bar + g_step
    return jnp.where(den > 0, 1.0 + scale * (g_bar - g_step) / jnp.where(den > 0, den, 1.0), 1.0)


def threshold(eps: jax.Array, w: jax.Array) -> jax.Array:
    """(L4) ``tau_i = eps_i + (omega_i - 1) |eps_i|`` (``= omega_i eps_i`` for ``eps_i >= 0``)."""
    return eps + (w - 1.0) * jnp.abs(eps)


def adaptive_k(entropy_per_dim: jax.Array, k_min: int, k_max: int, h_low: float,
               h_high: float) -> jax.Array:
    """(L6) ``round(K_min + (K_max - K_min) clip((h - h_low) / (h_high - h_low), 0, 1))``
    (int32); a non-finite entropy gives ``K_max`` (the conservative choice)."""
    frac = jnp.clip((entropy_per_dim - h_low) / (h_high - h_low), 0.0, 1.0)
    frac = jnp.where(jnp.isfinite(frac), frac, 1.0)
    return jnp.round(k_min + (k_max - k_min) * frac).astype(jnp.int32)


def warmed_up(env_steps: jax.Array, warmup_steps: int) -> jax.Array:
    """(L7) stopping is allowed once ``env_steps >= warmup_steps``."""
    return env_steps >= warmup_steps


def stop_decision(q: jax.Array, tau: jax.Array, n_valid: jax.Array, below: jax.Array, *,
                  active: jax.Array, min_episodes: int, patience: int
                  ) -> tuple[jax.Array, jax.Array]:
    """(L5) ``(stop, below')``: ``below'`` counts consecutive steps with ``q < tau`` (with at
    least ``min_episodes`` valid episodes at the step; a NaN threshold never counts), and an
    episode is stopped where ``active`` and ``below' >= patience``."""
    chex.assert_equal_shape([q, tau, n_valid, below])
    hit = (q < tau) & (n_valid >= min_episodes)
    below = jnp.where(hit, below + 1, 0).astype(jnp.int32)
    return active & (below >= patience), below


# --- the hook the agents call -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeastConfig(Config):
    k_min: int = field(5, ge=1, help="K at low policy entropy; also the fewest episodes at a "
                                     "step before stopping there")
    k_max: int = field(20, ge=1, help="rows of the memories (K at high entropy); >= num_envs")
    warmup_steps: int = field(10_000, ge=0, help="env steps (all envs) without stopping")
    omega_scale: float = field(0.5, ge=0, le=1, help="c of the TD-loss weight, omega in (1-c, 1+c)")
    patience: int = field(10, ge=1, help="consecutive steps below the threshold before a stop")
    entropy_low: float = field(-1.0, help="entropy per action dim mapped to k_min")
    entropy_high: float = field(1.0, help="entropy per action dim mapped to k_max")

    def validate(self) -> None:
        if self.k_min > self.k_max:
            raise self.invalid("k_min", f"must be <= k_max = {self.k_max}")
        if self.entropy_low >= self.entropy_high:
            raise self.invalid("entropy_low", f"must be < entropy_high = {self.entropy_high}")


@struct.dataclass
class LeastState:
    memory: Memory
    current_q: jax.Array  # [num_envs, L]: the episode in progress of every env
    current_g: jax.Array
    below: jax.Array  # [num_envs] int32: consecutive steps under the threshold
    k: jax.Array  # int32: the K of the last step
    threshold: jax.Array  # [num_envs]: the last step's tau (NaN: none)
    episodes: jax.Array  # int32: episodes ended (naturally or stopped)
    stopped: jax.Array  # int32: episodes stopped
    stopped_steps: jax.Array  # int32: transitions that belong to stopped episodes
    steps: jax.Array  # int32: transitions seen
    stop_hist: jax.Array  # [L] int32: stops by step index


@dataclasses.dataclass(frozen=True)
class Least:
    """The LEAST hook of an off-policy agent with ``num_envs`` environments whose episodes last
    at most ``max_steps`` steps. ``init()`` gives the state (kept in the agent's state, hence
    checkpointed and vmapped with it); ``step`` is called once per environment step."""

    config: LeastConfig
    num_envs: int
    max_steps: int

    def __post_init__(self):
        if self.num_envs > self.config.k_max:
            raise ValueError(f"LEAST k_max = {self.config.k_max} must be >= num_envs = "
                             f"{self.num_envs} (episodes ending together each need a row)")

    def init(self) -> LeastState:
        n, length = self.num_envs, self.max_steps
        zi = jnp.zeros((), jnp.int32)
        return LeastState(memory=init_memory(self.config.k_max, length),
                          current_q=jnp.zeros((n, length), jnp.float32),
                          current_g=jnp.zeros((n, length), jnp.float32),
                          below=jnp.zeros((n,), jnp.int32), k=jnp.asarray(self.config.k_max,
                                                                          jnp.int32),
                          threshold=jnp.full((n,), jnp.nan, jnp.float32), episodes=zi,
                          stopped=zi, stopped_steps=zi, steps=zi,
                          stop_hist=jnp.zeros((length,), jnp.int32))

    def step(self, st: LeastState, q: jax.Array, td_loss: jax.Array, step_index: jax.Array,
             done: jax.Array, entropy_per_dim: jax.Array, env_steps: jax.Array
             ) -> tuple[LeastState, jax.Array]:
        """One environment step of every env: ``q``/``td_loss`` ``[N]`` of the transition taken
        at ``step_index`` ``[N]`` (steps since its episode began), ``done`` ``[N]`` where the
        environment itself ended the episode. Records them, decides (L5) which running episodes
        to stop, and moves every ended episode (done or stopped) into the memories.
        Returns ``(state, stop [N] bool)``."""
        c = self.config
        chex.assert_shape([q, td_loss, step_index, done], (self.num_envs,))
        rows = jnp.arange(self.num_envs)
        t = jnp.clip(step_index, 0, self.max_steps - 1)
        cur_q = st.current_q.at[rows, t].set(q.astype(jnp.float32))
        cur_g = st.current_g.at[rows, t].set(td_loss.astype(jnp.float32))
        k = adaptive_k(entropy_per_dim, c.k_min, c.k_max, c.entropy_low, c.entropy_high)
        eps, g_step, n_valid = step_medians(st.memory, k, t)
        tau = threshold(eps, omega(g_step, mean_td_loss(st.memory, k), c.omega_scale))
        active = warmed_up(env_steps, c.warmup_steps) & ~done.astype(bool)
        stop, below = stop_decision(q, tau, n_valid, st.below, active=active,
                                    min_episodes=c.k_min, patience=c.patience)
        ended = done.astype(bool) | stop
        memory = write_episodes(st.memory, cur_q, cur_g, t + 1, ended)
        length = (t + 1).astype(jnp.int32)
        return st.replace(
            memory=memory, current_q=jnp.where(ended[:, None], 0.0, cur_q),
            current_g=jnp.where(ended[:, None], 0.0, cur_g),
            below=jnp.where(ended, 0, below), k=k, threshold=tau,
            episodes=st.episodes + jnp.sum(ended.astype(jnp.int32)),
            stopped=st.stopped + jnp.sum(stop.astype(jnp.int32)),
            stopped_steps=st.stopped_steps + jnp.sum(jnp.where(stop, length, 0)),
            steps=st.steps + self.num_envs,
            stop_hist=st.stop_hist.at[t].add(stop.astype(jnp.int32))), stop

    @staticmethod
    def metrics(st: LeastState) -> dict[str, jax.Array]:
        """Cumulative counters for the chunk metrics (``least/...``)."""
        f = jnp.float32
        return {"least/k": st.k.astype(f), "least/episodes": st.episodes.astype(f),
                "least/stopped": st.stopped.astype(f),
                "least/stop_fraction": st.stopped.astype(f) / jnp.maximum(st.episodes, 1),
                "least/stopped_share": st.stopped_steps.astype(f) / jnp.maximum(st.steps, 1)}


__all__ = [
    "Least",
    "LeastConfig",
    "LeastState",
    "Memory",
    "adaptive_k",
    "init_memory",
    "masked_median",
    "mean_td_loss",
    "omega",
    "step_medians",
    "stop_decision",
    "threshold",
    "valid_mask",
    "valid_rows",
    "warmed_up",
    "write_episodes",
]
