"""llm_rl.asyppo against independent oracles: numpy transcriptions of the paper's formulas,
python rankings for the masks, a NumPy GAE loop, separately applied critics, and plain PPO
(llm_rl.ppo) for M = 1, k = h = 0 (pure functions and one whole trainer iteration)."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from llm_rl import algorithms, asyppo, ppo
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM, ValueModel
from llm_rl.tokenization import char_tokenizer
from tests.llm_rl.model_helpers import random_model
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir
from trainkit.sharding import DEFAULT_RULES, make_mesh, param_shardings, to_host

TASK = (("max_ops", 1), ("max_value", 9))  # fixed-length prompts: one compilation per shape


# --- critic assignment -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(prompts=st.integers(1, 6), critics=st.integers(1, 4), extra=st.integers(0, 6))
def test_each_response_goes_to_exactly_one_critic_and_shares_are_equal(prompts, critics, extra):
    group = critics + extra
    a = asyppo.critic_assignment(prompts, group, critics)
    B = prompts * group
    assert a.shape == (critics, B)
    assert set(np.unique(a)) <= {0.0, 1.0}
    np.testing.assert_array_equal(a.sum(0), np.ones(B))  # exactly one critic per response
    totals = a.sum(1)
    if B % critics == 0:
        assert np.all(totals == B // critics)  # equal shares over the batch
    assert totals.max() - totals.min() <= 1
    per_group = a.reshape(critics, prompts, group).sum(-1)  # [M, P]
    assert np.all(per_group >= 1)  # every critic sees every prompt
    assert np.all(per_group.max(0) - per_group.min(0) <= 1)
    if group % critics == 0:
        assert np.all(per_group == group // critics)


def test_assignment_refuses_groups_smaller_than_the_ensemble():
    with pytest.raises(ValueError, match="every critic must see every prompt"):
        asyppo.critic_assignment(4, 2, 3)


# --- ensemble statistics and masks -----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 5), b=st.integers(1, 4), n=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_ensemble_stats_match_numpy(m, b, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(m, b, n)).astype(np.float32)
    mask = (rng.random((b, n)) < 0.7).astype(np.float32)
    mean, std = asyppo.ensemble_stats(jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(mean, v.mean(0) * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, v.std(0) * mask, rtol=1e-4, atol=1e-6)
    if m == 1:
        assert np.all(np.asarray(std) == 0)


def _oracle_mask(scores, valid, fraction, side):
    """The definition in plain python: rank valid tokens by (score, flat index), take
    floor(fraction * n) of them (fraction resolved to 1e-4, exact rational floor)."""
    flat, ok = scores.reshape(-1), valid.reshape(-1) > 0
    idx = [i for i in range(flat.size) if ok[i]]
    sign = 1.0 if side == "bottom" else -1.0
    idx.sort(key=lambda i: (sign * float(flat[i]), i))
    k = math.floor(Fraction(round(fraction * 10_000), 10_000) * len(idx))
    out = np.zeros(flat.size, bool)
    out[idx[:k]] = True
    return out.reshape(scores.shape), k


@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 5), n=st.integers(1, 9), percent=st.integers(0, 99),
       side=st.sampled_from(["bottom", "top"]), ties=st.booleans(), seed=st.integers(0, 10**6))
def test_masks_select_exactly_floor_fraction_of_valid_tokens_and_never_padding(
        b, n, percent, side, ties, seed):
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 3, (b, n)) if ties else rng.normal(size=(b, n))).astype(np.float32)
    valid = (rng.random((b, n)) < 0.6).astype(np.float32)
    # Padded tokens carry the most extreme scores on both sides: they must still be skipped.
    scores = np.where(valid > 0, scores, np.float32(-1e9 if seed % 2 else 1e9))
    fraction = percent / 100
    got = np.asarray(jax.jit(asyppo.percentile_mask, static_argnums=(2, 3))(
        jnp.asarray(scores), jnp.asarray(valid), fraction, side))
    want, k = _oracle_mask(scores, valid, fraction, side)
    assert got.sum() == k == math.floor(percent * int(valid.sum()) / 100 + 1e-9)
    assert not np.any(got & (valid == 0))
    np.testing.assert_array_equal(got, want)


def test_selection_count_is_an_exact_floor():
    for n, frac, k in ((100, 0.29, 29), (10, 0.3, 3), (7, 0.2, 1), (5, 0.0, 0), (3_000_001, 0.2, 600_000)):
        assert int(asyppo.selection_count(n, frac)) == k


# --- GAE -------------------------------------------------------------------------------------


def _gae_loop(rewards, values, lengths, gamma, lam):
    """A transcription of Schulman et al. 2016 (Eq. 16) per response, V = 0 after the end."""
    adv = np.zeros_like(rewards)
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = np.where(np.arange(rewards.shape[1])[None] < lengths[:, None], adv + values, 0.0)
    return adv, ret


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 8), gamma=st.floats(0.5, 1.0),
       lam=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_gae_matches_a_numpy_loop(b, n, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, b)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    rewards = (rng.normal(size=(b, n)) * mask).astype(np.float32)
    values = rng.normal(size=(b, n)).astype(np.float32)
    adv, ret = algorithms.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                              gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_loop(rewards.astype(np.float64), values * mask, lengths, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-4, atol=1e-5)


# --- the objective ---------------------------------------------------------------------------


def _objective_numpy(logp, old, adv, ent, lengths, adv_keep, ent_keep, eps, beta):
    """J = mean_o 1/|o| sum_t [I^A min(rho A, clip(rho) A) + beta I^H H], term by term."""
    total = 0.0
    for b, length in enumerate(lengths):
        s = 0.0
        for t in range(length):
            rho = math.exp(logp[b, t] - old[b, t])
            a = adv[b, t]
            s += adv_keep[b, t] * min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            s += beta * ent_keep[b, t] * ent[b, t]
        total += s / length
    return total / len(lengths)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 6), beta=st.floats(0.0, 0.5),
       seed=st.integers(0, 10**6))
def test_policy_loss_is_the_papers_masked_objective(b, n, beta, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, b)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    logp = (rng.normal(size=(b, n)) * 0.3 - 1).astype(np.float32)
    old = (logp + rng.normal(size=(b, n)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(b, n)).astype(np.float32)
    ent = rng.random((b, n)).astype(np.float32) * 2
    adv_keep = (rng.random((b, n)) < 0.7).astype(np.float32) * mask
    ent_keep = (rng.random((b, n)) < 0.7).astype(np.float32) * mask
    loss, _ = asyppo.policy_loss(*map(jnp.asarray, (logp, old, adv, ent, mask, adv_keep, ent_keep)),
                                 clip_eps=0.2, entropy_coef=beta)
    want = _objective_numpy(logp, old, adv, ent, lengths, adv_keep, ent_keep, 0.2, beta)
    np.testing.assert_allclose(float(loss), -want, rtol=1e-4, atol=1e-5)


def _rollout_arrays(seed, b=6, n=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, b)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    logp = ((rng.normal(size=(b, n)) * 0.4 - 1.2) * mask).astype(np.float32)
    ref = ((rng.normal(size=(b, n)) * 0.4 - 1.2) * mask).astype(np.float32)
    old = ((logp + rng.normal(size=(b, n)) * 0.2) * mask).astype(np.float32)
    values = rng.normal(size=(b, n)).astype(np.float32)
    ent = (rng.random((b, n)) * mask).astype(np.float32)
    rewards = rng.integers(0, 2, b).astype(np.float32)
    return [jnp.asarray(x) for x in (rewards, values, logp, ref, old, ent, mask)]


@pytest.mark.parametrize("placement,token_reward", [("none", False), ("reward", False),
                                                     ("reward", True), ("loss", False),
                                                     ("both", True)])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_one_critic_without_masks_is_plain_ppo(placement, token_reward, aggregation):
    rewards, values, logp, ref, old, ent, mask = _rollout_arrays(7)
    common = dict(placement=placement, estimator="k3", beta=0.1, kl_as_token_reward=token_reward,
                  gamma=0.97, lam=0.9, aggregation=aggregation, num_prompts=3, group_size=2)
    s_ppo = ppo.PPOSettings(**common)
    s_asy = asyppo.AsyPPOSettings(**common, num_critics=1, adv_mask_frac=0.0,
                                  ent_filter_frac=0.0, entropy_coef=0.0)
    adv, ret, _, pen = ppo.advantages_and_returns(rewards, values, logp, ref, mask, s_ppo)
    prep = asyppo.advantages_and_masks(rewards, values[None], logp, ref, mask, s_asy)
    np.testing.assert_allclose(prep.advantages, adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prep.returns, ret, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(prep.adv_keep, mask)
    np.testing.assert_array_equal(prep.ent_keep, mask)
    np.testing.assert_allclose(prep.penalty.reward, pen.reward, rtol=1e-6)
    want, _ = algorithms.clipped_surrogate(logp, old, adv, mask, clip_eps=0.2,
                                           aggregation=aggregation)
    got, _ = asyppo.policy_loss(logp, old, prep.advantages, ent, mask, prep.adv_keep,
                                prep.ent_keep, clip_eps=0.2, entropy_coef=0.0,
                                aggregation=aggregation)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # With an entropy bonus and h = 0: PPO's loss minus beta * the plain aggregated entropy.
    got_b, _ = asyppo.policy_loss(logp, old, prep.advantages, ent, mask, prep.adv_keep,
                                  prep.ent_keep, clip_eps=0.2, entropy_coef=0.3,
                                  aggregation=aggregation)
    np.testing.assert_allclose(got_b, want - 0.3 * algorithms.aggregate(ent, mask, aggregation),
                               rtol=1e-6, atol=1e-7)
    # Critic: one critic on all responses is PPO's value loss.
    new_values = values + 0.3
    total, per = asyppo.ensemble_value_loss(new_values[None], values[None], ret, mask,
                                            jnp.ones((1, mask.shape[0])), clip_eps=0.2)
    np.testing.assert_allclose(total, algorithms.value_loss(new_values, values, ret, mask,
                                                            clip_eps=0.2), rtol=1e-6)
    np.testing.assert_allclose(per, total[None], rtol=1e-6)


def test_masks_follow_the_critics_disagreement():
    """Two critics that agree on some tokens and disagree on others: the advantage is zeroed
    exactly on the lowest-sigma k% and the entropy bonus dropped on the highest-sigma h%."""
    rewards, values, logp, ref, _, _, mask = _rollout_arrays(3, b=4, n=6)
    spread = jnp.asarray(np.random.default_rng(0).random(values.shape).astype(np.float32))
    ens = jnp.stack([values - spread, values + spread])  # sigma_t = spread_t
    s = asyppo.AsyPPOSettings(placement="none", num_critics=2, adv_mask_frac=0.25,
                              ent_filter_frac=0.5, num_prompts=2, group_size=2)
    prep = asyppo.advantages_and_masks(rewards, ens, logp, ref, mask, s)
    np.testing.assert_allclose(prep.value_std, spread * mask, rtol=1e-5)
    np.testing.assert_allclose(prep.value_mean, values * mask, rtol=1e-5, atol=1e-6)
    sig, ok = np.asarray(spread), np.asarray(mask) > 0
    n = int(ok.sum())
    low = np.sort(sig[ok])[: n // 4]
    high = np.sort(sig[ok])[::-1][: n // 2]
    zeroed = ok & (np.asarray(prep.adv_keep) == 0)
    filtered = ok & (np.asarray(prep.ent_keep) == 0)
    np.testing.assert_allclose(np.sort(sig[zeroed]), low)
    np.testing.assert_allclose(np.sort(sig[filtered])[::-1], high)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_each_critic_learns_only_from_its_own_responses(m, seed):
    rng = np.random.default_rng(seed)
    P, G, N = 2, m + 1, 4
    B = P * G
    values = jnp.asarray(rng.normal(size=(m, B, N)).astype(np.float32))
    returns = rng.normal(size=(B, N)).astype(np.float32)
    lengths = rng.integers(1, N + 1, B)
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    a = asyppo.critic_assignment(P, G, m)
    total, per = asyppo.ensemble_value_loss(values, values, jnp.asarray(returns), jnp.asarray(mask),
                                            jnp.asarray(a), clip_eps=None)
    v = np.asarray(values)
    for c in range(m):
        tok = mask * a[c][:, None]
        want = 0.5 * (np.square(v[c] - returns) * tok).sum() / max(tok.sum(), 1)
        np.testing.assert_allclose(per[c], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, np.asarray(per).sum(), rtol=1e-6)
    # Changing the targets of critic 0's responses leaves every other critic's loss unchanged.
    moved = returns + 5.0 * a[0][:, None]
    _, per2 = asyppo.ensemble_value_loss(values, values, jnp.asarray(moved), jnp.asarray(mask),
                                         jnp.asarray(a), clip_eps=None)
    np.testing.assert_allclose(per2[1:], per[1:], rtol=1e-6)


# --- the ensemble ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    tokenizer = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8)
    critic_cfg = Qwen3Config.tiny(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=4)
    policy_graphdef, policy_params = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=0), nnx.Param)
    _, ref_params = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=1), nnx.Param)
    critics = [nnx.split(random_model(ValueModel, critic_cfg, seed=10 + m), nnx.Param)
               for m in range(3)]
    big_critic = nnx.split(random_model(ValueModel, cfg, seed=2), nnx.Param)
    return dict(tokenizer=tokenizer, cfg=cfg, critic_cfg=critic_cfg,
                policy_graphdef=policy_graphdef, policy_params=policy_params,
                ref_params=ref_params, critic_graphdef=critics[0][0],
                critic_list=[c[1] for c in critics], big_critic=big_critic)


def test_vmapped_ensemble_equals_separately_applied_critics(setup):
    graphdef, singles = setup["critic_graphdef"], setup["critic_list"]
    stacked = asyppo.stack_params(singles)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(4, len(setup["tokenizer"]), (3, 7)).astype(np.int32))
    mask = jnp.asarray(np.ones((3, 7), np.int32).copy())
    mask = mask.at[1, :2].set(0)
    got = jax.jit(lambda p: asyppo.ensemble_values(graphdef, p, ids, mask))(stacked)
    assert got.shape == (3, 3, 7)
    for m, params in enumerate(singles):
        alone = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, mask))(params)
        np.testing.assert_allclose(got[m], alone, rtol=1e-5, atol=1e-6)
        for x, y in zip(jax.tree.leaves(asyppo.critic_params(stacked, m)), jax.tree.leaves(params)):
            np.testing.assert_array_equal(x, y)
    # Different critics give different values (the test could not pass with one shared critic).
    assert float(jnp.abs(got[0] - got[1]).max()) > 1e-4
    # Response values: the shift of ppo.response_values, per critic.
    resp = asyppo.ensemble_response_values(graphdef, stacked, ids, mask, 4)
    np.testing.assert_allclose(resp, got[:, :, 3:6], rtol=1e-5, atol=1e-6)


def test_vmapped_optimizer_equals_one_optimizer_per_critic(setup):
    singles = setup["critic_list"][:2]
    opt = optax.chain(optax.clip_by_global_norm(0.01), optax.adam(1e-2))
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x, scale=1 + 9 * i: jnp.asarray(
        rng.normal(size=x.shape).astype(np.float32)) * scale, p) for i, p in enumerate(singles)]
    ens = asyppo.ensemble_optimizer(opt)
    stacked = asyppo.stack_params(singles)
    state = jax.jit(ens.init)(stacked)
    updates, state = jax.jit(ens.update)(asyppo.stack_params(grads), state, stacked)
    one = jax.jit(lambda g, p: opt.update(g, opt.init(p), p)[0])
    for m, (p, g) in enumerate(zip(singles, grads)):
        u = one(g, p)
        for x, y in zip(jax.tree.leaves(asyppo.critic_params(updates, m)), jax.tree.leaves(u)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def test_logprobs_and_entropy_from_one_forward(setup):
    from llm_rl.rl import response_logprobs

    graphdef, params = setup["policy_graphdef"], setup["policy_params"]
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(4, len(setup["tokenizer"]), (2, 8)).astype(np.int32))
    mask = jnp.asarray(np.array([[1] * 8, [0, 1, 1, 1, 1, 1, 1, 0]], np.int32))
    P, T = 5, 0.7
    logp, ent = asyppo.response_logprobs_and_entropy(graphdef, params, ids, mask, P, T)
    np.testing.assert_allclose(logp, response_logprobs(graphdef, params, ids, mask, P, T),
                               rtol=1e-5, atol=1e-6)
    logits = np.asarray(nnx.merge(graphdef, params)(ids, mask), np.float64) / T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = -(probs * np.log(probs)).sum(-1)[:, P - 1:-1] * np.asarray(mask)[:, P:]
    np.testing.assert_allclose(ent, want, rtol=1e-4, atol=1e-5)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="num_critics=1"):
        asyppo.AsyPPOSettings(num_critics=1)
    with pytest.raises(ValueError, match="each prompt needs"):
        asyppo.AsyPPOSettings(num_critics=4, group_size=2)
    with pytest.raises(ValueError, match="must divide"):
        asyppo.AsyPPOSettings(num_prompts=6, num_minibatches=4)
    with pytest.raises(ValueError, match="adv_mask_frac"):
        asyppo.AsyPPOSettings(adv_mask_frac=1.0)
    with pytest.raises(ValueError, match="estimator"):
        asyppo.AsyPPOSettings(estimator="k9")
    asyppo.AsyPPOSettings(num_critics=1, adv_mask_frac=0, ent_filter_frac=0)


def test_minibatch_plan_keeps_groups_whole_and_covers_every_row_each_epoch():
    plan = np.asarray(asyppo.minibatch_plan(jax.random.key(0), 6, 3, epochs=2, num_minibatches=3))
    assert plan.shape == (6, 6)
    for e in range(2):
        rows = plan[3 * e:3 * e + 3].reshape(-1)
        assert sorted(rows) == list(range(18))
    groups = plan.reshape(6, 2, 3)
    assert np.all(groups % 3 == np.arange(3)) and np.all(np.ptp(groups // 3, axis=-1) == 0)


# --- the trainer -----------------------------------------------------------------------------


def _asy_iteration(setup, settings, stacked=None):
    opt, copt = optax.adam(1e-2), optax.adam(1e-2)
    stacked = stacked if stacked is not None else asyppo.stack_params(
        setup["critic_list"][:settings.num_critics])
    iterate = asyppo.make_iteration(setup["policy_graphdef"], setup["ref_params"],
                                    setup["critic_graphdef"], opt, copt, setup["tokenizer"], settings)
    return iterate, asyppo.init_state(setup["policy_params"], stacked, opt, copt)


def _leaves_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **kw)


def test_one_critic_iteration_equals_the_ppo_trainer(setup):
    """One AsyPPO iteration with M = 1, k = h = 0, no entropy bonus, one epoch and one
    minibatch gives the parameters of one llm_rl.ppo iteration (same prompts and samples)."""
    common = dict(placement="both", kl_as_token_reward=True, beta=0.1, num_prompts=2,
                  group_size=2, max_new_tokens=4, task_kwargs=TASK, aggregation="token_mean")
    graphdef, params = setup["big_critic"]
    opt, copt = optax.adam(1e-2), optax.adam(1e-2)
    p_iter = ppo.make_iteration(setup["policy_graphdef"], setup["ref_params"], graphdef, opt, copt,
                                setup["tokenizer"], ppo.PPOSettings(**common))
    p_state, p_m = p_iter(ppo.init_state(setup["policy_params"], params, opt, copt, 0), 1)
    s = asyppo.AsyPPOSettings(**common, num_critics=1, adv_mask_frac=0, ent_filter_frac=0,
                              entropy_coef=0.0)
    a_iter = asyppo.make_iteration(setup["policy_graphdef"], setup["ref_params"], graphdef, opt,
                                   copt, setup["tokenizer"], s)
    a_state, a_m = a_iter(asyppo.init_state(setup["policy_params"],
                                            asyppo.stack_params([params]), opt, copt), 1)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(p_state.params),
                                                        jax.tree.leaves(setup["policy_params"])))
    _leaves_close(a_state.params, p_state.params, rtol=1e-5, atol=1e-6)
    _leaves_close(asyppo.critic_params(a_state.critic_params, 0), p_state.critic_params,
                  rtol=1e-5, atol=1e-6)
    for key in ("loss", "value_loss", "reward", "kl_k3", "explained_variance"):
        np.testing.assert_allclose(a_m[key], p_m[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def masked_iteration(setup):
    """One iteration of 2 critics with both masks, 2 epochs x 2 minibatches (shared by the
    trainer test and the sharded-equality test: one compile of the one-device update)."""
    s = asyppo.AsyPPOSettings(placement="reward", num_critics=2, num_prompts=2, group_size=4,
                              max_new_tokens=4, task_kwargs=TASK, epochs=2, num_minibatches=2,
                              adv_mask_frac=0.25, ent_filter_frac=0.2, entropy_coef=0.01)
    iterate, state = _asy_iteration(setup, s)
    new, m = iterate(state, 1)
    return s, iterate, state, new, m


def test_iteration_trains_every_critic_and_logs_the_masks(setup, masked_iteration):
    s, iterate, state, new, m = masked_iteration
    assert int(new.step) == 1
    for key in ("loss", "value_loss", "value_loss_c0", "value_loss_c1", "sigma_q10", "sigma_q50",
                "sigma_q90", "adv_masked_frac", "ent_filtered_frac", "value_mse_ensemble",
                "value_mse_single", "entropy", "clip_frac", "update_seconds"):
        assert m[key].shape == (1,), key
    for key, value in m.items():
        assert np.all(np.isfinite(value)), key
    assert m["skipped"][0] == 0 and m["critic_skipped"][0] == 0
    n = m["response_length"][0] * s.num_prompts * s.group_size
    np.testing.assert_allclose(m["adv_masked_frac"][0], math.floor(0.25 * round(n)) / round(n), rtol=1e-5)
    np.testing.assert_allclose(m["ent_filtered_frac"][0], math.floor(0.2 * round(n)) / round(n), rtol=1e-5)
    assert m["sigma_q90"][0] >= m["sigma_q50"][0] >= m["sigma_q10"][0] > 0
    # The ensemble mean is no worse than the average critic (Jensen: MSE of the mean <= mean MSE).
    assert m["value_mse_ensemble"][0] <= m["value_mse_single"][0] + 1e-6
    for c in range(2):
        before = asyppo.critic_params(state.critic_params, c)
        after = asyppo.critic_params(new.critic_params, c)
        assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

    # Non-finite rewards never reach the parameters: the step is skipped and counted.
    r = jnp.asarray([np.nan] + [1.0] * 7, jnp.float32)
    from llm_rl.rl import rollout

    ro = rollout(setup["policy_graphdef"], new.params, setup["tokenizer"], s, 1)
    bad, bm = iterate.update(new, ro.sequences, ro.seq_mask, ro.behavior_logp, ro.resp_mask, r,
                             jax.random.key(0))
    # The policy's advantages are whitened over the batch, so every policy step is NaN; the
    # critics' targets are NaN only in the minibatch holding prompt 0 (one per epoch).
    assert int(bm["skipped"]) == 4 and int(bm["critic_skipped"]) == 2
    assert int(bm["nonfinite_streak"]) == 4 and int(bm["critic_nonfinite_total"]) == 2
    _leaves_close(bad.params, new.params, rtol=0, atol=0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(bad.critic_params))


def test_resume_is_exact(setup, tmp_path):
    s = asyppo.AsyPPOSettings(placement="loss", num_critics=2, num_prompts=2, group_size=2,
                              max_new_tokens=4, task_kwargs=TASK, epochs=1, num_minibatches=2,
                              adv_mask_frac=0.2, ent_filter_frac=0.2, seed=5)
    iterate, state0 = _asy_iteration(setup, s)
    straight, logger = fit(RunDir(tmp_path / "a"), state0, iterate,
                           LoopSettings(num_steps=3, chunk_size=1, save_every=1, key_metric=None))
    logger.close()
    loop1 = LoopSettings(num_steps=2, chunk_size=1, save_every=1, key_metric=None)
    fit(RunDir(tmp_path / "b"), state0, iterate, loop1)[1].close()
    resumed, logger = fit(RunDir(tmp_path / "b"), state0, iterate,
                          LoopSettings(num_steps=3, chunk_size=1, save_every=1, key_metric=None),
                          resume=True)
    logger.close()
    assert int(resumed.step) == 3
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- on a mesh (8 simulated CPU devices, tests/conftest.py) ----------------------------------

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
ENSEMBLE_OVER_DATA = (("ensemble", "data"),) + DEFAULT_RULES
UP_PROJ = "['model']['layers'][0]['mlp']['up_proj']['kernel'].value"


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@needs8
@pytest.mark.parametrize("rules, lead", [(DEFAULT_RULES, None), (ENSEMBLE_OVER_DATA, "data")])
def test_ensemble_shardings_are_the_actors_plus_a_critic_axis(setup, rules, lead):
    """Each critic's dims are sharded exactly as one ValueModel (as the actor) is; the critic
    axis is replicated by default, or split over the mesh axis a rule names."""
    critics = setup["critic_list"][:2]
    mesh = make_mesh(2, 2, 2)
    stacked = asyppo.stack_params(critics)
    got = _flat(asyppo.ensemble_shardings(stacked, mesh, rules))
    one = _flat(param_shardings(critics[0], mesh, DEFAULT_RULES))
    shapes = {k: np.shape(v) for k, v in _flat(stacked).items()}
    assert got.keys() == one.keys() == shapes.keys()
    full = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))
    for name, sharding in got.items():
        ndim = len(shapes[name])
        assert full(sharding.spec, ndim) == (lead, *full(one[name].spec, ndim - 1)), name
    assert got[UP_PROJ].spec == P(lead, "fsdp", "model")  # fsdp over embed, model over mlp


@needs8
def test_sharded_iteration_equals_one_device(setup, masked_iteration):
    """The iteration of ``masked_iteration`` (same rollout, same minibatch key) on a
    data x fsdp x model = 2 x 2 x 2 mesh, critic axis over ``data``: same metrics and
    parameters as on one device, and afterwards every parameter and optimizer moment still
    carries its intended sharding."""
    from llm_rl.rl import rollout

    s, _, state, want, want_m = masked_iteration
    opt = copt = optax.adam(1e-2)  # as _asy_iteration
    mesh = make_mesh(2, 2, 2)
    shardings = asyppo.state_shardings(state, mesh, opt, copt, ENSEMBLE_OVER_DATA)
    sharded = asyppo.make_iteration(setup["policy_graphdef"], setup["ref_params"],
                                    setup["critic_graphdef"], opt, copt, setup["tokenizer"], s,
                                    shardings=shardings)
    ro = rollout(setup["policy_graphdef"], state.params, setup["tokenizer"], s, 0)
    batch = sharded.place_batch(ro.sequences, ro.seq_mask, ro.behavior_logp, ro.resp_mask,
                                ro.rewards)
    assert batch[0].sharding.spec == P(("data", "fsdp"))  # B = 8 rows over 4 devices
    got, got_m = sharded.update(jax.device_put(state, shardings), *batch,
                                jax.random.fold_in(jax.random.key(s.seed), 0))

    for k in ("loss", "value_loss", "value_loss_c0", "value_loss_c1", "sigma_q50",
              "adv_masked_frac", "entropy", "grad_norm", "reward"):
        np.testing.assert_allclose(got_m[k], want_m[k][0], rtol=2e-4, atol=1e-6, err_msg=k)
    assert int(got.step) == int(want.step) == 1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(to_host(a), np.asarray(b), rtol=2e-4, atol=2e-6)

    for part in ("params", "critic_params", "opt_state", "critic_opt_state"):
        pairs = zip(jax.tree_util.tree_flatten_with_path(getattr(got, part))[0],
                    jax.tree.leaves(getattr(shardings, part)))
        for (path, x), sh in pairs:
            assert x.sharding.is_equivalent_to(sh, x.ndim), (part, jax.tree_util.keystr(path))
    up = _flat(got.critic_params)[UP_PROJ]
    assert up.sharding.spec == P("data", "fsdp", "model")
    assert up.addressable_shards[0].data.shape == (1, 4, 8)  # [2, 8, 16] / (data, fsdp, model)
    q = _flat(got.params)["['model']['layers'][0]['self_attn']['q_proj']['kernel'].value"]
    assert q.sharding.spec == P("fsdp", "model", None)
