"""LEAST (learn to stop): early stopping of unproductive episodes for off-policy agents.

Liu, Obando-Ceron, Castro, Courville, Pan (2025), "The Courage to Stop: Overcoming Sunk Cost
Fallacy in Deep Reinforcement Learning", arXiv 2506.13672 (ICML 2025). No official code.

**Sources.** The paper's own text past its introduction was not readable here (arXiv HTML,
OpenReview and the ICML poster page give the abstract and introduction only). The rules
marked *Paper* below follow two public paper notes found in the code index (an English note
"LEAST: The Courage to Stop -- Overcoming Sunk Cost Fallacy in Deep RL" and an auto-generated
summary of the OpenReview PDF ``VzC3BAd9gf``) which state the formulas: ``B_Q in R^{K x L}``,
``eps_i = Median(B_Q[:, i])``, ``omega_i = Median(B_G[:, i]) / G_i``, stop when
``Q_i < omega_i eps_i`` (``eps_i >= 0``) or ``Q_i < eps_i / omega_i`` (``eps_i < 0``), ``K``
grown when the entropy of ``B_Q`` exceeds ``(1 + gamma)`` times its average (checked every
``c`` steps, by ``h`` episodes), a start time before which nothing stops, and an exploration
noise raised when episodes are stopped often (the paper's Eq. 4, TD3 only). Neither note
gives the paper's equation numbers for the other rules, so the labels (L1)-(L7) are this
module's own; every rule marked *Decision* is this implementation's choice where the notes
are silent.

The pieces:

* **Memories** (:class:`Memory`), *Paper*: ``B_Q, B_G in R^{K_max x L}`` (``L`` = the time
  limit), row ``r`` holding ``Q(s_i, a_i)`` and the TD loss ``delta_i^2`` (the paper's
  gradient-magnitude proxy ``G_i``) of every step ``i`` of one finished episode, a ring over
  episodes, ``length[r]`` the number of its steps. With an adaptive ``K <= K_max`` only the
  ``K`` most recent rows are *valid* (L1)::

      valid[r, i] = (age(r) < min(K, count)) and (i < length[r]),
      age(r) = (position - 1 - r) mod K_max

  so the arrays keep a fixed shape inside ``jit`` while ``K`` changes.
* **Per-step medians** (L2), *Paper*: ``eps_i = median{ B_Q[r, i] : valid[r, i] }`` and
  ``m_i = median{ B_G[r, i] : valid[r, i] }`` (NaN when no episode reached step ``i``).
* **Learning-potential weight** (L3), *Paper*: ``omega_i = m_i / G_i`` with ``G_i`` the TD loss
  of the current step: a step the critic fits worse than usual (``G_i > m_i``, something left
  to learn) gets ``omega_i < 1``, a laxer threshold. *Decision*: the ratio is clipped to
  ``[1 - c, 1 + c]`` (``c = omega_scale``; the notes tune an "omega coefficient" in
  ``[0.3, 0.6]`` without defining it), so a near-zero TD loss cannot make the threshold
  infinite; ``0 / 0`` gives 1.
* **Threshold** (L4), *Paper*: ``tau_i = omega_i eps_i`` for ``eps_i >= 0`` and
  ``eps_i / omega_i`` for ``eps_i < 0`` (so ``omega_i > 1`` is stricter for either sign).
* **Stop decision** (L5): an episode at step ``i`` with estimate ``q = min_j Q_j(s_i, a_i)``
  is stopped when ``q < tau_i`` (*Paper*) after warm-up, with at least ``K_min`` valid
  episodes at step ``i`` (*Decision*), for ``patience`` consecutive steps (*Decision*; the
  paper's rule is ``patience = 1``). With random initial states ``patience = 1`` stops about
  half of all episodes at their very first step (the initial state's Q is below the step-0
  median half the time: on gymnax Pendulum 23 of 33 episodes were stopped, every one at step
  0); ``patience = 10`` asks for a *sustained* shortfall, which is what "stuck in a
  suboptimal trajectory" means, and makes ``patience - 1`` the earliest stop step.
* **Entropy-aware K** (L6), *Paper*: every ``k_every`` env steps the entropy ``H_t`` of
  ``B_Q`` is compared with the running mean ``Hbar`` of the earlier ``H``; ``K`` grows by
  ``k_step`` when ``H_t > Hbar + gamma |Hbar|`` (the paper's ``(1 + gamma) Hbar``, written
  so that it also means "higher" for a negative entropy) and shrinks by ``k_step``
  otherwise, within ``[K_min, K_max]``, starting at ``k_init`` (the paper: 250 episodes).
  *Decision*: ``H`` is the Gaussian entropy ``1/2 log(2 pi e v)`` of ``v``, the mean over
  steps of the variance of ``B_Q[:, i]`` across the ``max(K, 2)`` newest episodes (the notes
  motivate the rule by "large variance between adjacent trajectories"; they do not define
  ``H``). Q grows in scale while the critic learns, so ``H`` tends to rise and K to grow
  (on brax hopper K reached ``K_max`` within 5k steps for SAC and 14k for TD3).
* **Warm-up** (L7), *Paper* (the start time, 10-20% of training on MuJoCo): no stop while
  fewer than ``warmup_steps`` environment steps are done.

Not implemented: the paper's exploration-noise schedule (Eq. 4: TD3's Gaussian noise raised
by a sigmoid of how often the last ``m`` episodes stopped before step ``e``; the notes report
SAC insensitive to it). A stopped episode is a *truncation*: the agent stores ``terminated =
0`` and the step's own next observation, so its target bootstraps (``y = r + gamma Q(s')``),
and the environment is reset (:func:`jaxrl_suite.agents.sac.stop_episodes`); the notes say
the partial trajectory is "stored in the replay buffer as usual". Everything is a pure
function of arrays, usable under ``jit`` and ``vmap`` over seeds; :class:`Least` is the hook
the agents call at every environment step (``SAC(config, env, early_stop=Least(...))``).
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


def omega(g_now: jax.Array, g_median: jax.Array, scale: float) -> jax.Array:
    """(L3) ``omega_i = clip(m_i / G_i, 1 - c, 1 + c)``: the step's median TD loss over the
    memory (``m_i``) over the current TD loss (``G_i``); 1 where both are 0 (no information),
    ``1 + c`` where only ``G_i`` is 0. NaN ``m_i`` (no episode reached the step) stays NaN."""
    ratio = g_median / jnp.where(g_now > 0, g_now, 1.0)
    ratio = jnp.where(g_now > 0, ratio, jnp.where(g_median > 0, jnp.inf, 1.0))
    return jnp.where(jnp.isnan(g_median), jnp.nan, jnp.clip(ratio, 1.0 - scale, 1.0 + scale))


def threshold(eps: jax.Array, w: jax.Array) -> jax.Array:
    """(L4) ``tau_i = omega_i eps_i`` for ``eps_i >= 0``, ``eps_i / omega_i`` for ``eps_i < 0``."""
    return jnp.where(eps >= 0, w * eps, eps / w)


def q_entropy(memory: Memory, k: jax.Array | int) -> jax.Array:
    """(L6) ``H = 1/2 log(2 pi e v)``, ``v`` the mean over steps (with >= 2 valid episodes) of the
    variance of ``B_Q[:, i]`` across the valid episodes; NaN when no step has two."""
    mask = valid_mask(memory, k)
    n = jnp.sum(mask, axis=0)
    mean = jnp.sum(jnp.where(mask, memory.q, 0.0), axis=0) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(mask, (memory.q - mean) ** 2, 0.0), axis=0) / jnp.maximum(n - 1, 1)
    steps = n >= 2
    v = jnp.sum(jnp.where(steps, var, 0.0)) / jnp.sum(steps)
    return 0.5 * jnp.log(2 * jnp.pi * jnp.e * jnp.maximum(v, 1e-12))


def update_k(k: jax.Array, h: jax.Array, h_bar: jax.Array, h_count: jax.Array, *, k_min: int,
             k_max: int, k_step: int, overflow: float
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(L6) One check of the entropy rule: ``K +/- k_step`` (within ``[k_min, k_max]``) as ``h``
    is above ``Hbar + gamma |Hbar|`` or not, then ``h`` joins the running mean ``Hbar``.
    The first finite ``h`` only starts ``Hbar``; a NaN ``h`` changes nothing.
    Returns ``(k, h_bar, h_count)``."""
    ok = jnp.isfinite(h)
    up = h > h_bar + overflow * jnp.abs(h_bar)
    new_k = jnp.clip(jnp.where(up, k + k_step, k - k_step), k_min, k_max).astype(jnp.int32)
    k = jnp.where(ok & (h_count > 0), new_k, k)
    count = h_count + ok.astype(jnp.int32)
    h_bar = jnp.where(ok, h_bar + (jnp.where(ok, h, 0.0) - h_bar) / jnp.maximum(count, 1), h_bar)
    return k, h_bar, count


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
    k_min: int = field(5, ge=1, help="smallest K; also the fewest episodes at a step before "
                                     "stopping there")
    k_max: int = field(20, ge=1, help="rows of the memories (largest K); >= num_envs")
    k_init: int = field(0, ge=0, help="K at the start (0: k_max); the paper starts at 250")
    k_step: int = field(1, ge=1, help="h: episodes K moves by at each entropy check")
    k_every: int = field(1000, ge=1, help="c: env steps between entropy checks of B_Q")
    entropy_overflow: float = field(0.05, ge=0, help="gamma: K grows when H > Hbar + gamma |Hbar|")
    warmup_steps: int = field(10_000, ge=0, help="env steps (all envs) without stopping")
    omega_scale: float = field(0.5, ge=0, lt=1, help="c: omega clipped to [1 - c, 1 + c]")
    patience: int = field(10, ge=1, help="consecutive steps below the threshold before a stop")

    def validate(self) -> None:
        if self.k_min > self.k_max:
            raise self.invalid("k_min", f"must be <= k_max = {self.k_max}")
        if self.k_init and not self.k_min <= self.k_init <= self.k_max:
            raise self.invalid("k_init", f"must be 0 or in [k_min, k_max] = [{self.k_min}, "
                                         f"{self.k_max}]")


@struct.dataclass
class LeastState:
    memory: Memory
    current_q: jax.Array  # [num_envs, L]: the episode in progress of every env
    current_g: jax.Array
    below: jax.Array  # [num_envs] int32: consecutive steps under the threshold
    k: jax.Array  # int32: the current K (L6)
    h_bar: jax.Array  # running mean of the entropy checks of B_Q (L6)
    h_count: jax.Array  # int32: entropy checks so far
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
                          below=jnp.zeros((n,), jnp.int32),
                          k=jnp.asarray(self.config.k_init or self.config.k_max, jnp.int32),
                          h_bar=jnp.zeros((), jnp.float32), h_count=zi,
                          threshold=jnp.full((n,), jnp.nan, jnp.float32), episodes=zi,
                          stopped=zi, stopped_steps=zi, steps=zi,
                          stop_hist=jnp.zeros((length,), jnp.int32))

    def step(self, st: LeastState, q: jax.Array, td_loss: jax.Array, step_index: jax.Array,
             done: jax.Array, entropy_per_dim: jax.Array, env_steps: jax.Array
             ) -> tuple[LeastState, jax.Array]:
        """One environment step of every env: ``q``/``td_loss`` ``[N]`` of the transition taken
        at ``step_index`` ``[N]`` (steps since its episode began), ``done`` ``[N]`` where the
        environment itself ended the episode. Records them, decides (L5) which running episodes
        to stop, moves every ended episode (done or stopped) into the memories, and every
        ``k_every`` env steps applies the entropy rule to K (L6). ``entropy_per_dim`` (the
        policy's) is part of the agents' hook interface and unused: the paper's K follows the
        entropy of ``B_Q``. Returns ``(state, stop [N] bool)``."""
        del entropy_per_dim
        c = self.config
        chex.assert_shape([q, td_loss, step_index, done], (self.num_envs,))
        rows = jnp.arange(self.num_envs)
        t = jnp.clip(step_index, 0, self.max_steps - 1)
        cur_q = st.current_q.at[rows, t].set(q.astype(jnp.float32))
        cur_g = st.current_g.at[rows, t].set(td_loss.astype(jnp.float32))
        eps, g_med, n_valid = step_medians(st.memory, st.k, t)
        tau = threshold(eps, omega(td_loss.astype(jnp.float32), g_med, c.omega_scale))
        active = warmed_up(env_steps, c.warmup_steps) & ~done.astype(bool)
        stop, below = stop_decision(q, tau, n_valid, st.below, active=active,
                                    min_episodes=c.k_min, patience=c.patience)
        ended = done.astype(bool) | stop
        memory = write_episodes(st.memory, cur_q, cur_g, t + 1, ended)
        length = (t + 1).astype(jnp.int32)
        check = (st.steps // c.k_every) != ((st.steps + self.num_envs) // c.k_every)

        def entropy_rule(_):
            # over at least 2 episodes: a spread needs two, and K = 1 must be able to grow
            h = q_entropy(memory, jnp.maximum(st.k, 2))
            return update_k(st.k, h, st.h_bar, st.h_count, k_min=c.k_min, k_max=c.k_max,
                            k_step=c.k_step, overflow=c.entropy_overflow)

        # a cond, so an unbatched run pays for the O(K_max L) entropy only every k_every steps
        k, h_bar, h_count = jax.lax.cond(check, entropy_rule,
                                         lambda _: (st.k, st.h_bar, st.h_count), None)
        return st.replace(
            memory=memory, current_q=jnp.where(ended[:, None], 0.0, cur_q),
            current_g=jnp.where(ended[:, None], 0.0, cur_g),
            below=jnp.where(ended, 0, below), k=k, h_bar=h_bar, h_count=h_count, threshold=tau,
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
    "init_memory",
    "masked_median",
    "omega",
    "q_entropy",
    "step_medians",
    "stop_decision",
    "threshold",
    "update_k",
    "valid_mask",
    "valid_rows",
    "warmed_up",
    "write_episodes",
]
