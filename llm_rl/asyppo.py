"""AsyPPO: PPO whose value comes from an ensemble of M small critics ("mini-critics"), each
trained on its own share of every prompt's responses; the critics' disagreement masks
advantages and filters the entropy bonus.

Reference: Liu, Obando-Ceron et al., "Asymmetric Proximal Policy Optimization: mini-critics
boost LLM reasoning", arXiv 2510.01656 (ICLR 2026; no official code). The formulas below are
the paper's (Sec. "Lightweight value estimation" for the ensemble and its loss L_critic, Sec.
"Policy loss reconstruction" for the two masks). Equation numbers are not cited: the paper's
text could not be read past its abstract from here (the arXiv HTML v2 page, the ICLR/OpenReview
page 0vgzrcv4Dr and third-party summaries were searched, see docs/asyppo_results.md), so the
docstrings name each quantity as the paper does instead of guessing a number. The critic loss
sum_m E_{(s_t, R_t) ~ D_m}[(V(s_t; phi_m) - R_t)^2] was checked against the formula quoted by a
review of the paper (themoonlight.io).

Batch layout as everywhere in :mod:`llm_rl`: B = P * G responses, prompt p owning the rows
p*G .. p*G+G-1; per-token arrays [B, N] over the response tokens, ``mask`` 1 on real tokens.

Pure pieces (arrays in, arrays out):

- :func:`critic_assignment` -- which critic learns from which response. Every prompt's group
  is split into M disjoint parts, one per critic (every critic sees every prompt, on
  different responses): row r goes to critic ``r mod M``. With G divisible by M each critic
  gets exactly G/M responses of every prompt. With uneven groups (G mod M != 0) the split
  rotates from prompt to prompt (prompt p starts at critic p*G mod M): inside a group the
  critics' counts differ by at most one, and over the batch they are equal whenever B is a
  multiple of M (else they differ by at most one). G < M is refused (some critic would miss
  a prompt).
- :func:`ensemble_stats` -- mean_m V_m(s_t) (the value GAE uses; the paper found the mean
  better than the min) and the population standard deviation
  sigma_t = sqrt(1/M sum_m (V_m(s_t) - mean)^2) over the critic axis.
- :func:`percentile_mask` -- the tokens whose sigma_t is in the bottom (or top) fraction q of
  the batch's valid tokens: exactly floor(q * n) of the n valid tokens, never a padded one;
  ties are broken by position (the earlier flattened index [b, t] ranks first).
- :func:`advantages_and_masks` -- token-level GAE (:func:`llm_rl.algorithms.gae`,
  Schulman et al. 2016 Eq. 16) on the ensemble mean, with the rewards and KL configuration of
  :mod:`llm_rl.ppo` (any estimator / placement of :mod:`llm_rl.kl`); then the masks
  I^A_t = 1 - [sigma_t in the bottom k%]  (critics agree: little to learn, advantage zeroed)
  I^H_t = 1 - [sigma_t in the top h%]     (critics disagree: no entropy bonus there).
- :func:`policy_loss` -- the AsyPPO objective, maximised, per response o:
  J = E_o (1/|o|) sum_t [ I^A_t min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)
                          + beta I^H_t H(pi(.|s_t)) ],
  rho_t = pi(o_t|s_t) / pi_old(o_t|s_t); the loss is -J (plus the KL loss of the placement).
- :func:`ensemble_value_loss` -- sum_m E_{(s_t, R_t) in D_m} [(V_m(s_t) - R_t)^2] (times the
  1/2 and the optional value clipping of :func:`llm_rl.algorithms.value_loss`), D_m the
  tokens of the responses assigned to critic m.

With M = 1 and k = h = 0 every mask is all ones and the objective is PPO's
(:mod:`llm_rl.ppo`), plus the entropy bonus when beta > 0 (tested to float tolerance).

The ensemble (:func:`init_ensemble`, :func:`ensemble_from_pretrained`): M
:class:`~llm_rl.models.ValueModel` s of one config, their parameters stacked on a leading
critic axis, applied with ``jax.vmap`` (one compiled forward for all M) and optimised with a
vmapped optax transformation (:func:`ensemble_optimizer`: each critic gets its own optimizer
state and, with ``clip_by_global_norm``, its own gradient norm).

On a mesh (:func:`ensemble_shardings`, :func:`state_shardings`): each critic is sharded like
the actor by the same logical-axis rules (fsdp over ``embed``, ``model`` over ``mlp``/heads);
the stacked critic axis (logical name ``"ensemble"``) is replicated by default, or split over
a mesh axis when the rules map it (e.g. ``("ensemble", "data")``). ``make_iteration(...,
shardings=...)`` keeps the whole train state on those shardings; a sharded iteration equals
the one-device iteration (tested on 8 simulated CPU devices).

The trainer (:func:`make_iteration`) is :mod:`llm_rl.ppo`'s iteration with the critic
replaced by the ensemble: the same prompts, rollouts (:func:`llm_rl.rl.rollout`), token
rewards and KL configurations, plus several PPO epochs (UTD) over minibatches of whole
prompt groups (off-policy reuse of each rollout batch), all in one jitted update.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from llm_rl import algorithms, ppo
from llm_rl.kl import kl_penalty
from llm_rl.models import ValueModel, token_logprobs
from llm_rl.rl import rollout, rollout_placement
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.sharding import DEFAULT_RULES, local_replica, param_shardings, replicated, to_host

ENSEMBLE_AXIS = "ensemble"  # logical name of the stacked critic axis (see ensemble_shardings)
FRACTION_UNITS = 10_000  # mask fractions are resolved to 1e-4 (basis points): exact integer floor


# --- pure pieces -----------------------------------------------------------------------------


def critic_assignment(num_prompts: int, group_size: int, num_critics: int) -> np.ndarray:
    """One-hot [M, B] float32: ``out[m, r] = 1`` iff response row r trains critic m.

    Row r = p*G + i (response i of prompt p) goes to critic ``r mod M`` (see the module
    docstring for uneven groups). A static function of the shapes, so numpy."""
    if min(num_prompts, group_size, num_critics) < 1:
        raise ValueError(f"num_prompts, group_size and num_critics must be >= 1, got "
                         f"{num_prompts}, {group_size}, {num_critics}")
    if group_size < num_critics:
        raise ValueError(f"group_size={group_size} < num_critics={num_critics}: every critic "
                         "must see every prompt, so each group needs at least one response "
                         "per critic")
    rows = np.arange(num_prompts * group_size)
    return (rows[None, :] % num_critics == np.arange(num_critics)[:, None]).astype(np.float32)


def ensemble_stats(values: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean, std) over the critic axis of ``values`` [M, B, N]: mean_m V_m and the population
    std sqrt(mean_m (V_m - mean)^2) (0 for M = 1). Zero where ``mask`` [B, N] is 0.

    The std is the paper's disagreement sigma_t; only its ranking is used, so the choice of
    population vs sample std (a constant factor) does not change the masks."""
    chex.assert_rank(values, 3)
    mean = values.mean(axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(values - mean[None]), axis=0))
    if mask is not None:
        chex.assert_equal_shape([mean, mask])
        mask = mask.astype(values.dtype)
        mean, std = mean * mask, std * mask
    return mean, std


def _fraction_units(fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return int(round(fraction * FRACTION_UNITS))


def selection_count(num_valid: jax.Array | int, fraction: float) -> jax.Array:
    """floor(fraction * n) in exact integer arithmetic, with ``fraction`` resolved to 1e-4
    (so 0.29 * 100 is 29, not the 28 a float floor of 28.999999999999996 would give)."""
    q = _fraction_units(fraction)
    n = jnp.asarray(num_valid, jnp.int32)
    return (n // FRACTION_UNITS) * q + ((n % FRACTION_UNITS) * q) // FRACTION_UNITS


def percentile_mask(scores: jax.Array, valid: jax.Array, fraction: float,
                    side: str = "bottom") -> jax.Array:
    """Boolean [B, N]: the floor(fraction * n) valid tokens with the lowest (``side="bottom"``)
    or highest (``"top"``) scores, n = number of valid tokens in the whole batch.

    Definition (no quantile interpolation): valid tokens are ranked by score, ascending for
    "bottom" and descending for "top"; equal scores are ranked by flattened position
    (row-major [b, t], earlier first); the first floor(fraction * n) ranks are selected.
    Padded tokens (``valid == 0``) rank after every valid token whatever their score, so they
    are never selected. NaN scores rank after finite ones on both sides."""
    chex.assert_rank(scores, 2)
    chex.assert_equal_shape([scores, valid])
    if side not in ("bottom", "top"):
        raise ValueError(f"side={side!r} is invalid: must be 'bottom' or 'top'")
    flat = scores.reshape(-1)
    is_valid = valid.reshape(-1) > 0
    k = selection_count(is_valid.sum(), fraction)
    key = flat if side == "bottom" else -flat
    # lexsort: the last key is the primary one; the sort is stable, so ties keep index order.
    order = jnp.lexsort((key, jnp.logical_not(is_valid).astype(jnp.int32)))
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return ((ranks < k) & is_valid).reshape(scores.shape)


def token_entropy(logits: jax.Array) -> jax.Array:
    """H(softmax(logits)) over the last axis, in float32: -sum_v p_v log p_v."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class Prepared(NamedTuple):
    """What an AsyPPO update needs per token, from the old (detached) ensemble values."""

    advantages: jax.Array  # [B, N] GAE on the ensemble mean (whitened if the settings say so)
    returns: jax.Array  # [B, N] critic targets R_t = raw GAE advantages + mean value
    value_mean: jax.Array  # [B, N]
    value_std: jax.Array  # [B, N] sigma_t
    adv_keep: jax.Array  # [B, N] I^A_t (0 on the bottom-k% sigma tokens and on padding)
    ent_keep: jax.Array  # [B, N] I^H_t (0 on the top-h% sigma tokens and on padding)
    penalty: Any  # llm_rl.kl.KLPenalty of the rollout


def advantages_and_masks(rewards: jax.Array, values: jax.Array, logp: jax.Array,
                         ref_logp: jax.Array, mask: jax.Array, settings: "AsyPPOSettings"
                         ) -> Prepared:
    """GAE on the ensemble mean and the two sigma masks, from sequence rewards [B], old
    ensemble values V_m(s_t) [M, B, N] and detached log-probs [B, N].

    Token rewards, the KL configuration, GAE (gamma, lam) and whitening are exactly
    :func:`llm_rl.ppo.advantages_and_returns` with V = mean_m V_m; the advantage mask is applied
    after whitening (masked tokens contribute 0 to the policy loss but still count in 1/|o|)."""
    chex.assert_rank(values, 3)
    mask = mask.astype(jnp.float32)
    mean, std = ensemble_stats(values, mask)
    adv, returns, _, penalty = ppo.advantages_and_returns(rewards, mean, logp, ref_logp, mask,
                                                          settings)
    adv_keep = mask * (1.0 - percentile_mask(std, mask, settings.adv_mask_frac, "bottom"))
    ent_keep = mask * (1.0 - percentile_mask(std, mask, settings.ent_filter_frac, "top"))
    return Prepared(adv, returns, mean, std, adv_keep, ent_keep, penalty)


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                entropy: jax.Array, mask: jax.Array, adv_keep: jax.Array, ent_keep: jax.Array, *,
                clip_eps: float | None, entropy_coef: float,
                aggregation: algorithms.Aggregation = "seq_mean_token_mean",
                budget: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-J with J = E_o (1/|o|) sum_t [I^A_t min(rho A, clip(rho, 1-eps, 1+eps) A)
    + beta I^H_t H_t]  (the paper's masked PPO-clip objective with filtered entropy).

    ``aggregation="seq_mean_token_mean"`` is the paper's E_o (1/|o|) sum_t; any aggregation of
    :func:`llm_rl.algorithms.aggregate` may be used instead (the same for both terms).
    ``entropy`` [B, N] is differentiable (H of the current policy); everything else is treated
    as constant. Returns (loss, metrics)."""
    chex.assert_equal_shape([logp, old_logp, advantages, entropy, mask, adv_keep, ent_keep])
    pg, metrics = algorithms.clipped_surrogate(logp, old_logp, advantages * adv_keep, mask,
                                               clip_eps=clip_eps, aggregation=aggregation,
                                               budget=budget)
    ent_bonus = algorithms.aggregate(entropy * jax.lax.stop_gradient(ent_keep), mask,
                                     aggregation, budget)
    metrics = {**metrics, "entropy": jax.lax.stop_gradient(
        algorithms.aggregate(entropy, mask, "token_mean")),
               "entropy_bonus": jax.lax.stop_gradient(ent_bonus)}
    return pg - entropy_coef * ent_bonus, metrics


def ensemble_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                        mask: jax.Array, assignment: jax.Array, *,
                        clip_eps: float | None = 0.2) -> tuple[jax.Array, jax.Array]:
    """(sum_m L_m, [L_m]) with L_m = :func:`llm_rl.algorithms.value_loss` of critic m on the
    tokens of its own responses only: 0.5 * token-mean over D_m of max((V_m - R)^2,
    (clip(V_m, V_m^old +- eps) - R)^2). ``values``/``old_values`` [M, B, N], ``returns`` and
    ``mask`` [B, N], ``assignment`` [M, B] (:func:`critic_assignment`). Each critic's gradient
    comes from its own term only (the parameters are disjoint)."""
    chex.assert_rank([values, old_values, assignment], [3, 3, 2])
    chex.assert_equal_shape([values, old_values])
    per_critic_mask = mask.astype(values.dtype)[None] * assignment[:, :, None]
    losses = jax.vmap(lambda v, o, m: algorithms.value_loss(v, o, returns, m, clip_eps=clip_eps)
                      )(values, old_values, per_critic_mask)
    return losses.sum(), losses


# --- the ensemble ----------------------------------------------------------------------------


def stack_params(params: Sequence[Any]) -> Any:
    """Stack M parameter pytrees of one structure on a new leading (critic) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params)


def critic_params(stacked: Any, m: int) -> Any:
    """Critic m's parameters from the stacked ensemble."""
    return jax.tree.map(lambda x: x[m], stacked)


def init_ensemble(cfg, num_critics: int, *, seed: int = 0, param_dtype: Any = jnp.float32
                  ) -> tuple[Any, Any]:
    """(graphdef, stacked params) of M freshly initialised ``ValueModel(cfg)`` (seeds
    seed .. seed+M-1). ``cfg`` is any family config of the zoo: the critic size is a config
    choice, from ``Qwen3Config.tiny(...)`` to the actor's own config."""
    graphdef, params = None, []
    for m in range(num_critics):
        graphdef, p = nnx.split(ValueModel(cfg, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(seed + m)), nnx.Param)
        params.append(p)
    return graphdef, stack_params(params)


def ensemble_from_pretrained(path, num_critics: int, *, seed: int = 0,
                             dtype: Any = jnp.float32, mesh=None) -> tuple[Any, Any, Any]:
    """(graphdef, stacked params, config): M critics whose trunks are loaded from the HF
    checkpoint at ``path`` (e.g. Qwen3-0.6B-Base) and whose value heads are initialised from
    seeds seed .. seed+M-1 (the paper's critics all start from one pre-trained checkpoint;
    their diversity comes from the data split). On a mesh, place the stacked result with
    ``jax.device_put(stacked, ensemble_shardings(stacked, mesh))`` (or the whole state with
    :func:`state_shardings`)."""
    from llm_rl.models import from_pretrained

    graphdef, params, cfg = None, [], None
    for m in range(num_critics):
        model, cfg = from_pretrained(path, dtype=dtype, mesh=mesh, value_head=True, seed=seed + m)
        graphdef, p = nnx.split(model, nnx.Param)
        params.append(p)
    return graphdef, stack_params(params), cfg


def ensemble_values(graphdef, stacked: Any, input_ids: jax.Array,
                    attention_mask: jax.Array) -> jax.Array:
    """All critics' values [M, B, T] in one vmapped forward."""
    return jax.vmap(lambda p: nnx.merge(graphdef, p)(input_ids, attention_mask))(stacked)


def ensemble_response_values(graphdef, stacked: Any, sequences: jax.Array, seq_mask: jax.Array,
                             prompt_len: int) -> jax.Array:
    """V_m(s_t) [M, B, N] for the response tokens (the shift of
    :func:`llm_rl.ppo.response_values`: ``values[:, P-1+t]``)."""
    values = ensemble_values(graphdef, stacked, sequences, seq_mask)
    n = sequences.shape[1] - prompt_len
    return jax.vmap(lambda v: ppo.response_values(v, prompt_len, n))(values)


def ensemble_shardings(stacked: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
                       ) -> Any:
    """``NamedSharding`` s for a stacked ensemble, laid out like the actor.

    Each leaf [M, ...] gets the logical axes ``(ENSEMBLE_AXIS, *its own logical axes)`` and
    goes through the same rules table as the actor (:func:`trainkit.sharding.param_shardings`):
    every critic's own dims are sharded exactly as the actor's (``embed`` over ``fsdp``,
    ``mlp``/``heads``/``vocab`` over ``model`` with :data:`~trainkit.sharding.DEFAULT_RULES`).
    The critic axis is replicated by default (no rule names it): M is 2-4, rarely a multiple of
    a mesh axis, and fsdp already splits each critic. A rules table that maps it, e.g.
    ``(("ensemble", "data"),) + DEFAULT_RULES``, puts different critics on different data
    replicas instead (each holds M / |data| critics rather than all M; the vmapped forward
    then moves the batch across that axis). A mesh axis is used at most once per leaf, the critic axis first; dims a mesh axis
    does not divide are replicated."""
    def relabel(variable):
        value = variable.get_value()
        logical = variable.get_metadata().get("out_sharding") or (None,) * (np.ndim(value) - 1)
        return variable.replace(value, out_sharding=(ENSEMBLE_AXIS, *logical))

    is_var = lambda x: isinstance(x, nnx.Variable)
    relabelled = jax.tree.map(relabel, stacked, is_leaf=is_var)
    # Back onto the tree of ``stacked`` itself (its metadata is part of the pytree structure).
    return jax.tree.unflatten(jax.tree.structure(stacked),
                              jax.tree.leaves(param_shardings(relabelled, mesh, rules)))


def ensemble_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` applied to each critic of a stacked ensemble independently (vmapped): its
    own moments and, for ``clip_by_global_norm``, its own norm."""
    return optax.GradientTransformation(
        init=jax.vmap(optimizer.init),
        update=lambda g, s, p=None: jax.vmap(optimizer.update)(g, s, p))


def response_logprobs_and_entropy(graphdef, params, sequences, seq_mask, prompt_len: int,
                                  temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log pi_T(response tokens) [B, N], H(pi_T(.|s_t)) [B, N]) from one forward pass; the
    log-probs equal :func:`llm_rl.rl.response_logprobs`, the entropy is that of the
    temperature-T distribution the sampler draws from, 0 outside the response mask."""
    logits = nnx.merge(graphdef, params)(sequences, seq_mask)
    if temperature != 1.0:
        logits = logits / temperature
    logp = token_logprobs(logits, sequences, seq_mask)[:, prompt_len - 1:]
    n = sequences.shape[1] - prompt_len
    ent = token_entropy(logits[:, prompt_len - 1:prompt_len - 1 + n])
    resp_mask = seq_mask[:, prompt_len:].astype(jnp.float32)
    return logp, ent * resp_mask


# --- settings, state, trainer ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AsyPPOSettings(ppo.PPOSettings):
    """:class:`llm_rl.ppo.PPOSettings` plus the ensemble, the masks and the update schedule.

    ``adv_mask_frac`` is k (the bottom-k fraction of sigma whose advantages are zeroed; the
    paper's best k = 20%), ``ent_filter_frac`` is h (top-h fraction of sigma without entropy
    bonus; best h = 20%), ``entropy_coef`` is beta. ``epochs`` passes (UTD) over the rollout
    batch, each split into ``num_minibatches`` minibatches of whole prompt groups, one guarded
    step each (the off-policy ratio: all but the first step of an iteration use rollouts of an
    older policy, importance-weighted and clipped). ``aggregation`` defaults to the paper's
    per-response mean."""

    num_critics: int = 2
    adv_mask_frac: float = 0.2
    ent_filter_frac: float = 0.2
    entropy_coef: float = 0.001
    epochs: int = 1
    num_minibatches: int = 1
    aggregation: str = "seq_mean_token_mean"

    def __post_init__(self):
        super().__post_init__()
        if self.staleness:
            raise ValueError("AsyPPO reuses rollouts through epochs and num_minibatches; "
                             f"staleness must be 0, got {self.staleness}")
        for name in ("adv_mask_frac", "ent_filter_frac"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.num_critics < 1 or self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("num_critics, epochs and num_minibatches must be >= 1, got "
                             f"{self.num_critics}, {self.epochs}, {self.num_minibatches}")
        if self.num_critics == 1 and (self.adv_mask_frac or self.ent_filter_frac):
            raise ValueError("with num_critics=1 sigma is 0 everywhere and the masks would pick "
                             "tokens by position only; set adv_mask_frac=ent_filter_frac=0")
        if self.group_size < self.num_critics:
            raise ValueError(f"group_size={self.group_size} < num_critics={self.num_critics}: "
                             "each prompt needs at least one response per critic")
        if self.num_prompts % self.num_minibatches:
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide "
                             f"num_prompts={self.num_prompts} (minibatches hold whole groups)")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")


class AsyPPOState(NamedTuple):
    params: Any  # policy (the name of RLState/PPOState.params: evaluation code works on all)
    critic_params: Any  # stacked [M, ...]
    opt_state: Any
    critic_opt_state: Any  # vmapped over the critic axis
    guard: GuardState
    critic_guard: GuardState
    step: jax.Array  # iterations (rollout batches) done


def init_state(params: Any, critic_params: Any, optimizer: optax.GradientTransformation,
               critic_optimizer: optax.GradientTransformation) -> AsyPPOState:
    """``critic_optimizer`` is the per-critic optimizer (it is vmapped here)."""
    return AsyPPOState(params, critic_params, optimizer.init(params),
                       ensemble_optimizer(critic_optimizer).init(critic_params), init_guard(),
                       init_guard(), jnp.zeros((), jnp.int32))


def state_shardings(state: AsyPPOState, mesh: Mesh, optimizer: optax.GradientTransformation,
                    critic_optimizer: optax.GradientTransformation,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> AsyPPOState:
    """An :class:`AsyPPOState` of ``NamedSharding`` s: the policy by its logical axes
    (:func:`trainkit.sharding.param_shardings`, as ``from_pretrained(mesh=...)`` places it),
    the critics by :func:`ensemble_shardings`, each optimizer moment like its parameter
    (``optax.tree_map_params``; ``critic_optimizer`` is the per-critic one, its vmapped state
    has the same structure), counters, guards and step replicated. Place a state with
    ``jax.device_put(state, shardings)`` and pass ``shardings`` to :func:`make_iteration`."""
    rep = replicated(mesh)
    actor = param_shardings(state.params, mesh, rules)
    critics = ensemble_shardings(state.critic_params, mesh, rules)
    like = lambda opt, st, sh: optax.tree_map_params(opt, lambda _, x: x, st, sh,
                                                     transform_non_params=lambda _: rep)
    everywhere = lambda tree: jax.tree.map(lambda _: rep, tree)
    return AsyPPOState(actor, critics, like(optimizer, state.opt_state, actor),
                       like(critic_optimizer, state.critic_opt_state, critics),
                       everywhere(state.guard), everywhere(state.critic_guard), rep)


def minibatch_plan(key: jax.Array, num_prompts: int, group_size: int, epochs: int,
                   num_minibatches: int) -> jax.Array:
    """Row indices [epochs * num_minibatches, B / num_minibatches]: each epoch a fresh
    permutation of the prompt groups (identity with one minibatch), cut into minibatches of
    whole groups, rows of a group kept together (so every critic keeps its share)."""
    per = num_prompts // num_minibatches
    if num_minibatches == 1:
        groups = jnp.tile(jnp.arange(num_prompts)[None], (epochs, 1))
    else:
        groups = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), num_prompts)
                            for e in range(epochs)])
    groups = groups.reshape(epochs * num_minibatches, per)
    rows = groups[:, :, None] * group_size + jnp.arange(group_size)[None, None]
    return rows.reshape(epochs * num_minibatches, per * group_size)


def _masked_quantiles(x: jax.Array, mask: jax.Array, qs: Sequence[float]) -> jax.Array:
    return jnp.nanquantile(jnp.where(mask > 0, x, jnp.nan), jnp.asarray(qs))


def make_iteration(policy_graphdef, ref_params, critic_graphdef,
                   policy_optimizer: optax.GradientTransformation,
                   critic_optimizer: optax.GradientTransformation, tokenizer,
                   settings: AsyPPOSettings, *, shardings: AsyPPOState | None = None
                   ) -> Callable[[AsyPPOState, int], tuple[AsyPPOState, dict]]:
    """``iterate(state, n) -> (state, metrics stacked over the n iterations)``, the ``chunk``
    of :func:`trainkit.loop.fit` (as :func:`llm_rl.ppo.make_iteration`). ``critic_optimizer``
    is per critic (vmapped here). The jitted update is ``iterate.update``;
    ``iterate.with_seed(seed)`` is the iteration of another seed sharing it.

    One iteration: the step's prompts and rollouts exactly as :mod:`llm_rl.rl`/:mod:`llm_rl.ppo`
    (a function of seed and step); reference and current log-probs, old ensemble values, GAE
    on their mean and the sigma masks once per batch; then ``epochs * num_minibatches``
    guarded steps on the policy and on every critic (each on its own responses), in a
    ``lax.scan``. Minibatch order comes from a key folded from (seed, step), so a resumed run
    replays the same updates.

    ``shardings`` (:func:`state_shardings`): run on that mesh. The update keeps the state on
    those shardings (jit ``out_shardings``), the reference policy is placed like the actor and
    each rollout batch is split over the mesh's batch axes (``data`` x ``fsdp``; replicated
    when B is not a multiple of their size, which several processes refuse). With several
    processes each samples and grades only its rows of the batch, from its own copy of the
    policy, and uploads them (:func:`llm_rl.rl.rollout_placement`, :func:`llm_rl.rl.rollout`'s
    ``rows``). ``None``: one device, as before."""
    s = settings
    M = s.num_critics
    assignment = jnp.asarray(critic_assignment(s.num_prompts, s.group_size, M))  # [M, B]
    critic_opt = ensemble_optimizer(critic_optimizer)
    logp_fn = lambda p, seq, sm, P: response_logprobs_and_entropy(policy_graphdef, p, seq, sm, P,
                                                                  s.temperature)

    mesh = None if shardings is None else jax.tree.leaves(shardings)[0].mesh
    place_batch = rollout_placement(mesh, s.num_prompts * s.group_size)
    if shardings is not None:
        ref_params = jax.device_put(ref_params, shardings.params)

    def update(state: AsyPPOState, sequences, seq_mask, behavior_logp, resp_mask, rewards, key):
        prompt_len = sequences.shape[1] - resp_mask.shape[1]
        mask = resp_mask.astype(jnp.float32)
        ref_logp = jax.lax.stop_gradient(logp_fn(ref_params, sequences, seq_mask, prompt_len)[0])
        now_logp = jax.lax.stop_gradient(logp_fn(state.params, sequences, seq_mask, prompt_len)[0])
        old_values = jax.lax.stop_gradient(ensemble_response_values(
            critic_graphdef, state.critic_params, sequences, seq_mask, prompt_len))
        prep = advantages_and_masks(rewards, old_values, now_logp, ref_logp, mask, s)

        batch = dict(sequences=sequences, seq_mask=seq_mask, behavior_logp=behavior_logp,
                     mask=mask, ref_logp=ref_logp, adv=prep.advantages, returns=prep.returns,
                     adv_keep=prep.adv_keep, ent_keep=prep.ent_keep,
                     old_values=jnp.swapaxes(old_values, 0, 1), assignment=assignment.T)
        plan = minibatch_plan(key, s.num_prompts, s.group_size, s.epochs, s.num_minibatches)

        def one_step(carry, rows):
            params, opt_state, guard, cparams, copt_state, cguard = carry
            mb = jax.tree.map(lambda x: x[rows], batch)

            def policy_loss_fn(p):
                logp, ent = logp_fn(p, mb["sequences"], mb["seq_mask"], prompt_len)
                pg, pm = policy_loss(logp, mb["behavior_logp"], mb["adv"], ent, mb["mask"],
                                     mb["adv_keep"], mb["ent_keep"], clip_eps=s.clip_eps,
                                     entropy_coef=s.entropy_coef, aggregation=s.aggregation,
                                     budget=s.max_new_tokens)
                kl_loss = kl_penalty(logp, mb["ref_logp"], mb["mask"], estimator=s.estimator,
                                     placement=s.placement, beta=s.beta,
                                     normalization=s.normalization).loss
                return pg + kl_loss, (pm, kl_loss)

            def critic_loss_fn(cp):
                values = ensemble_response_values(critic_graphdef, cp, mb["sequences"],
                                                  mb["seq_mask"], prompt_len)
                return ensemble_value_loss(values, jnp.swapaxes(mb["old_values"], 0, 1),
                                           mb["returns"], mb["mask"], mb["assignment"].T,
                                           clip_eps=s.value_clip_eps)

            (loss, (pm, kl_loss)), grads = jax.value_and_grad(policy_loss_fn, has_aux=True)(params)
            params, opt_state, guard, gm = guarded_update(policy_optimizer, grads, opt_state,
                                                          params, loss, guard)
            (v_loss, per_critic), cgrads = jax.value_and_grad(critic_loss_fn, has_aux=True)(cparams)
            cparams, copt_state, cguard, cgm = guarded_update(critic_opt, cgrads, copt_state,
                                                              cparams, v_loss, cguard)
            critic_norms = jax.vmap(optax.global_norm)(cgrads)
            metrics = {"loss": loss, "kl_loss": kl_loss, "grad_norm": optax.global_norm(grads),
                       "value_loss": v_loss, "value_loss_per_critic": per_critic,
                       "critic_grad_norm_per_critic": critic_norms, **pm,
                       "skipped": gm["skipped"], "critic_skipped": cgm["skipped"]}
            return (params, opt_state, guard, cparams, copt_state, cguard), metrics

        carry = (state.params, state.opt_state, state.guard, state.critic_params,
                 state.critic_opt_state, state.critic_guard)
        carry, steps = jax.lax.scan(one_step, carry, plan)
        params, opt_state, guard, cparams, copt_state, cguard = carry

        # Iteration metrics: the inner steps' mean, skips summed, plus the batch's diagnostics.
        metrics = {k: v.mean(0) for k, v in steps.items() if k not in ("skipped", "critic_skipped")}
        metrics["skipped"] = steps["skipped"].sum()
        metrics["critic_skipped"] = steps["critic_skipped"].sum()
        per_critic = metrics.pop("value_loss_per_critic")
        norms = metrics.pop("critic_grad_norm_per_critic")
        for m in range(M):
            metrics[f"value_loss_c{m}"] = per_critic[m]
            metrics[f"critic_grad_norm_c{m}"] = norms[m]
        n_tokens = jnp.maximum(mask.sum(), 1.0)
        tmean = lambda x: (x * mask).sum() / n_tokens
        # Monte-Carlo returns (lam = 1: independent of the critics) for the prediction error.
        token_r, _ = ppo.token_rewards(rewards, now_logp, ref_logp, mask, s)
        mc_adv, mc_ret = algorithms.gae(token_r, jnp.zeros_like(mask), mask, gamma=s.gamma, lam=1.0)
        del mc_adv
        per_critic_mse = jax.vmap(lambda v: tmean(jnp.square(v - mc_ret)))(old_values)
        q10, q50, q90 = _masked_quantiles(prep.value_std, mask, (0.1, 0.5, 0.9))
        log_ratio = (now_logp - ref_logp) * mask
        metrics.update({
            "reward": rewards.mean(), "advantage_abs": tmean(jnp.abs(prep.advantages)),
            "kl_penalty_reward": prep.penalty.reward.mean(),
            "kl_k1": log_ratio.sum(-1).mean(),
            "kl_k3": ((jnp.expm1(-log_ratio) + log_ratio) * mask).sum(-1).mean(),
            "neg_logp_per_token": -tmean(now_logp), "response_length": mask.sum(-1).mean(),
            "value_mean": tmean(prep.value_mean), "return_mean": tmean(prep.returns),
            "explained_variance": ppo.explained_variance(prep.value_mean, prep.returns, mask),
            "sigma_q10": q10, "sigma_q50": q50, "sigma_q90": q90, "sigma_mean": tmean(prep.value_std),
            "adv_masked_frac": 1.0 - tmean(prep.adv_keep), "ent_filtered_frac": 1.0 - tmean(prep.ent_keep),
            "value_mse_ensemble": tmean(jnp.square(prep.value_mean - mc_ret)),
            "value_mse_single": per_critic_mse.mean(),  # the average critic alone
            "nonfinite_streak": jnp.maximum(guard.streak, cguard.streak),
            "policy_nonfinite_streak": guard.streak, "critic_nonfinite_streak": cguard.streak,
            "nonfinite_total": guard.total, "critic_nonfinite_total": cguard.total,
        })
        new_state = AsyPPOState(params, cparams, opt_state, copt_state, guard, cguard,
                                state.step + 1)
        return new_state, metrics

    update = jax.jit(update) if shardings is None else jax.jit(
        update, out_shardings=(shardings, replicated(mesh)))

    def with_seed(seed: int):
        """The same iteration for another seed, sharing the compiled update (the update never
        reads the seed: prompts, samples and the minibatch key are made on the host)."""
        return _make_iterate(dataclasses.replace(s, seed=seed))

    def _make_iterate(run_settings: AsyPPOSettings):
        base_key = jax.random.key(run_settings.seed)

        def iterate(state: AsyPPOState, n: int) -> tuple[AsyPPOState, dict]:
            rows = []
            for _ in range(n):
                step = int(state.step)
                r = rollout(policy_graphdef, local_replica(state.params), tokenizer, run_settings,
                            step, rows=place_batch.rows)
                start = time.perf_counter()
                state, metrics = update(state, *place_batch(r.sequences, r.seq_mask,
                                                            r.behavior_logp, r.resp_mask,
                                                            r.rewards),
                                        jax.random.fold_in(base_key, step))
                metrics = jax.tree.map(to_host, metrics)
                metrics["update_seconds"] = np.float32(time.perf_counter() - start)
                rows.append(metrics)
            return state, {k: np.stack([r[k] for r in rows]) for k in rows[0]}

        iterate.update = update
        iterate.place_batch = place_batch
        iterate.with_seed = with_seed
        return iterate

    return _make_iterate(s)
