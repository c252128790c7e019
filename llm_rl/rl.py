"""RL fine-tuning of a causal LM on verifiable tasks, with any KL configuration, on-policy or
with stale (asynchronous) rollouts.

One iteration:

1. ``P`` prompts are drawn (deterministically from the seed and the iteration) and each is
   answered ``G`` times by the *behaviour* policy: the current parameters when
   ``staleness == 0``, else the parameters of ``staleness`` updates ago, kept in the train
   state (this reproduces asynchronous actor/learner pipelines, where rollouts come from an
   older policy version).
2. A verifier grades every response: reward R in {0, 1}.
3. The KL penalty (:func:`llm_rl.kl.kl_penalty`) is computed with the current policy's
   log-probs at the start of the update: its ``reward`` part is subtracted from R before
   group advantages (:func:`llm_rl.algorithms.group_advantages`) are formed; its ``loss``
   part is added to the loss, importance-corrected when the rollouts are stale.
4. One gradient step on  clipped_surrogate(logp, behaviour_logp, A) + KL loss  (the ratio is
   taken against the behaviour policy, so stale samples are importance-weighted and
   clipped), guarded against non-finite values.

:func:`make_iteration` returns a host function ``iterate(state, n) -> (state, metrics)`` that
runs ``n`` iterations with the generation and update jitted and grading on the host; it is the
``chunk`` that :func:`trainkit.loop.fit` drives, so checkpoints, resume, logging and the
progress bar come from trainkit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llm_rl import algorithms, tasks
from llm_rl.kl import kl_penalty
from llm_rl.models import token_logprobs
from llm_rl.sampling import generate
from llm_rl.tokenization import encode_prompts
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.sharding import (
    BATCH_AXES,
    batch_sharding,
    local_replica,
    make_global_batch,
    process_batch_slice,
    replicated,
    to_host,
)


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Everything an iteration needs besides the model (plain values, hashable)."""

    estimator: str = "k3"
    placement: str = "loss"  # reward | loss | both | none
    beta: float = 0.05
    normalization: str = "sum"
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce
    aggregation: str = "seq_mean_token_mean"
    clip_eps: float | None = 0.2
    num_prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    staleness: int = 0
    task: str = "arithmetic"
    task_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.staleness > 0 and self.placement == "both":
            raise ValueError("placement='both' with stale rollouts would count the KL score "
                             "term twice; use 'reward' or 'loss' when staleness > 0")


class RLState(NamedTuple):
    params: Any
    opt_state: Any
    guard: GuardState
    step: jax.Array
    stale: tuple  # parameters of the last `staleness` versions, oldest first


def init_state(params: Any, optimizer: optax.GradientTransformation, staleness: int) -> RLState:
    copy = lambda: jax.tree.map(jnp.array, params)
    return RLState(params, optimizer.init(params), init_guard(), jnp.zeros((), jnp.int32),
                   tuple(copy() for _ in range(staleness)))


def response_logprobs(graphdef, params, sequences, seq_mask, prompt_len, temperature=1.0):
    """log pi_T(response tokens) [B, N] under ``params`` (zeros outside the response), with
    the logits divided by the sampling temperature T: the policy being optimised is the one
    that samples, so its log-probs match the sampler's ``logprobs`` (ratio 1 on-policy)."""
    model = nnx.merge(graphdef, params)
    logits_fn = model if temperature == 1.0 else (lambda ids, m: model(ids, m) / temperature)
    logp = token_logprobs(logits_fn, sequences, seq_mask)
    return logp[:, prompt_len - 1:]


PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: few shapes, few compiles


def sample_problems(settings: "RLSettings", step: int) -> list[tasks.Problem]:
    """The ``num_prompts`` problems of iteration ``step`` (a function of seed and step only,
    so resumed runs and different trainers see the same prompts)."""
    rng = np.random.default_rng([settings.seed, int(step)])
    factory = tasks.TASKS[settings.task][0]
    return [factory(rng, **dict(settings.task_kwargs)) for _ in range(settings.num_prompts)]


class Rollout(NamedTuple):
    sequences: jax.Array  # [B, P + N] prompt (left-padded) + response
    seq_mask: jax.Array
    behavior_logp: jax.Array  # [B, N] log-probs under the sampling policy
    resp_mask: jax.Array  # [B, N]
    rewards: jax.Array  # [B] verifier rewards
    texts: list


def rollout(graphdef, behavior_params, tokenizer, settings: "RLSettings", step: int,
            rows: np.ndarray | None = None) -> Rollout:
    """Sample ``group_size`` answers to each of the step's problems and grade them: the batch
    of ``num_prompts x group_size`` rows, problem-major. ``rows`` (indices into that batch):
    only those rows, sampled and graded exactly as in the whole batch (every row draws from its
    own random stream, :func:`llm_rl.sampling.generate`'s ``row_ids``, and the prompts are
    padded to the whole batch's width), which is how a multi-process run divides sampling."""
    s = settings
    problems = sample_problems(s, step)
    repeated = [p for p in problems for _ in range(s.group_size)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in repeated],
                                             pad_to_multiple=PROMPT_BUCKET)
    rows = np.arange(len(repeated)) if rows is None else np.asarray(rows)
    prompt_ids, prompt_mask = np.asarray(prompt_ids)[rows], np.asarray(prompt_mask)[rows]
    repeated = [repeated[i] for i in rows]
    out = generate(nnx.merge(graphdef, behavior_params), prompt_ids, prompt_mask,
                   jax.random.key(s.seed * 1_000_003 + step), max_new_tokens=s.max_new_tokens,
                   temperature=s.temperature, eos_ids=(tokenizer.eos_token_id,),
                   pad_id=tokenizer.pad_token_id, row_ids=rows)
    texts = tokenizer.batch_decode(np.asarray(out.tokens), skip_special_tokens=True)
    rewards = np.asarray([tasks.grade(t, p) for t, p in zip(texts, repeated)], np.float32)
    sequences = jnp.concatenate([jnp.asarray(prompt_ids), out.tokens], axis=1)
    seq_mask = jnp.concatenate([jnp.asarray(prompt_mask), out.mask], axis=1)
    return Rollout(sequences, seq_mask, out.logprobs, out.mask, jnp.asarray(rewards), texts)


def rollout_placement(mesh, rows: int) -> Callable[..., tuple]:
    """``place(*arrays)``: the arrays of this process's rows of a rollout batch of ``rows``
    rows (``place.rows``, their indices in the batch: pass them to :func:`rollout`) as global
    arrays split over the batch axes (``data`` x ``fsdp``) of ``mesh``, each process uploading
    only the rows it sampled. ``mesh=None``: ``place.rows`` is None (the whole batch) and the
    arrays stay as they are (one device). ``ValueError`` when ``rows`` is not a multiple of
    the mesh's batch devices."""
    if mesh is None:
        def place(*xs):
            return xs

        place.rows = None
        return place
    sharding = batch_sharding(mesh)
    parts = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if rows % parts and jax.process_count() == 1:
        sharding = replicated(mesh)  # one process may keep an uneven batch whole
    elif rows % parts:
        raise ValueError(f"a rollout batch of {rows} rows (prompts x group size) cannot be split "
                         f"over the {parts} data-parallel devices; use a multiple")
    mine = np.arange(rows)[process_batch_slice(sharding, (rows,))]

    def place(*xs):
        return make_global_batch(tuple(np.asarray(x) for x in xs), sharding,
                                 tuple((rows, *np.shape(x)[1:]) for x in xs))

    place.rows = mine
    return place


def make_iteration(graphdef, ref_params, optimizer: optax.GradientTransformation, tokenizer,
                   settings: RLSettings, *, mesh=None) -> Callable[[RLState, int], tuple[RLState, dict]]:
    """``iterate(state, n)``, the chunk of :func:`trainkit.loop.fit` (module doc).

    ``mesh`` (several devices or processes): the state (place it with
    ``jax.device_put(state, replicated(mesh))``) and the reference stay replicated on it and
    each update's batch is split over its batch axes, so the gradient is reduced over every
    device of every process. Every process samples and grades only its rows of the batch
    (:func:`rollout_placement`), from its own copy of the behaviour parameters
    (:func:`trainkit.sharding.local_replica`), each row from its own random stream, so the
    processes divide the sampling and together draw the tokens one process would.
    ``None``: one device."""
    s = settings
    place = rollout_placement(mesh, s.num_prompts * s.group_size)
    if mesh is not None:
        ref_params = jax.device_put(ref_params, replicated(mesh))

    def update(state: RLState, ref_params, sequences, seq_mask, behavior_logp, resp_mask, rewards):
        prompt_len = sequences.shape[1] - resp_mask.shape[1]
        mask = resp_mask.astype(jnp.float32)
        ref_logp = jax.lax.stop_gradient(
            response_logprobs(graphdef, ref_params, sequences, seq_mask, prompt_len, s.temperature))
        now_logp = jax.lax.stop_gradient(
            response_logprobs(graphdef, state.params, sequences, seq_mask, prompt_len, s.temperature))
        stale = s.staleness > 0
        penalty = kl_penalty(now_logp, ref_logp, mask, estimator=s.estimator,
                             placement=s.placement, beta=s.beta, normalization=s.normalization)
        adv = algorithms.group_advantages(rewards - penalty.reward, s.group_size, s.advantage)

        def loss_fn(params):
            logp = response_logprobs(graphdef, params, sequences, seq_mask, prompt_len, s.temperature)
            pg, pg_metrics = algorithms.clipped_surrogate(
                logp, behavior_logp, adv, mask, clip_eps=s.clip_eps, aggregation=s.aggregation,
                budget=s.max_new_tokens)
            kl_loss = kl_penalty(logp, ref_logp, mask, estimator=s.estimator,
                                 placement=s.placement, beta=s.beta,
                                 normalization=s.normalization,
                                 behavior_logp=behavior_logp if stale else None).loss
            return pg + kl_loss, (pg_metrics, kl_loss)

        (loss, (pg_metrics, kl_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, guard, gm = guarded_update(optimizer, grads, state.opt_state,
                                                      state.params, loss, state.guard)
        lengths = mask.sum(-1)
        log_ratio = (now_logp - ref_logp) * mask
        metrics = {
            "loss": loss, "kl_loss": kl_loss, "grad_norm": optax.global_norm(grads),
            "reward": rewards.mean(), "advantage_abs": jnp.abs(adv).mean(),
            "kl_penalty_reward": penalty.reward.mean(),
            # Per-sequence KL(pi || ref) estimates on the batch (k1 and k3, summed over tokens).
            "kl_k1": log_ratio.sum(-1).mean(),
            "kl_k3": ((jnp.expm1(-log_ratio) + log_ratio) * mask).sum(-1).mean(),
            "neg_logp_per_token": -(now_logp * mask).sum() / jnp.maximum(mask.sum(), 1.0),
            "response_length": lengths.mean(),
            "staleness_log_ratio": jnp.abs((now_logp - behavior_logp) * mask).sum() / jnp.maximum(mask.sum(), 1.0),
            **pg_metrics, **gm,
        }
        stale_params = state.stale[1:] + (state.params,) if stale else ()
        return RLState(params, opt_state, guard, state.step + 1, stale_params), metrics

    update = jax.jit(update) if mesh is None else jax.jit(update, out_shardings=replicated(mesh))

    def iterate(state: RLState, n: int) -> tuple[RLState, dict]:
        rows = []
        for _ in range(n):
            behavior = local_replica(state.stale[0] if s.staleness > 0 else state.params)
            r = rollout(graphdef, behavior, tokenizer, s, int(state.step), rows=place.rows)
            state, metrics = update(state, ref_params, *place(r.sequences, r.seq_mask,
                                                              r.behavior_logp, r.resp_mask,
                                                              r.rewards))
            rows.append(jax.tree.map(to_host, metrics))
        return state, {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    return iterate


def greedy_accuracy(graphdef, params, tokenizer, problems: Sequence[tasks.Problem],
                    max_new_tokens: int) -> tuple[float, float]:
    """(accuracy, fraction with a parsable answer) of greedy answers to ``problems``."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in problems],
                                             pad_to_multiple=PROMPT_BUCKET)
    out = generate(nnx.merge(graphdef, params), prompt_ids, prompt_mask, jax.random.key(0),
                   max_new_tokens=max_new_tokens, greedy=True, eos_ids=(tokenizer.eos_token_id,),
                   pad_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(np.asarray(out.tokens), skip_special_tokens=True)
    correct = [tasks.grade(t, p) for t, p in zip(texts, problems)]
    formatted = [tasks.extract_answer(t) is not None for t in texts]
    return float(np.mean(correct)), float(np.mean(formatted))
