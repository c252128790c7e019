"""llm_rl.ppo: the value alignment, the KL-as-token-reward returns against numpy, and the PPO
iteration (on-policy and stale) with a tiny random Qwen3 policy and critic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm_rl import ppo
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM, ValueModel
from llm_rl.tokenization import char_tokenizer
from tests.llm_rl.model_helpers import random_model

TASK = (("max_ops", 1), ("max_value", 9))  # fixed-length prompts: one compilation per shape


@pytest.fixture(scope="module")
def setup():
    tokenizer = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=8)
    policy = random_model(Qwen3ForCausalLM, cfg, seed=0)
    policy_graphdef, policy_params = nnx.split(policy, nnx.Param)
    _, ref_params = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=1), nnx.Param)  # KL != 0
    critic_graphdef, critic_params = nnx.split(random_model(ValueModel, cfg, seed=2), nnx.Param)
    return dict(tokenizer=tokenizer, cfg=cfg, policy_graphdef=policy_graphdef,
                policy_params=policy_params, ref_params=ref_params,
                critic_graphdef=critic_graphdef, critic_params=critic_params)


def test_values_for_response_token_t_come_from_position_p_minus_1_plus_t(setup):
    """V(s_t) is the critic's output at position P-1+t, after the prefix that ends just before
    response token t: it equals values[:, P-1+t] of the full sequence, and it does not change
    when tokens P+t, P+t+1, ... are replaced (it never sees token t or later)."""
    graphdef, params = setup["critic_graphdef"], setup["critic_params"]
    vocab = len(setup["tokenizer"])
    P, N = 4, 3
    full_values = jax.jit(lambda ids, mask: nnx.merge(graphdef, params)(ids, mask))
    used_values = jax.jit(lambda ids, mask: ppo._response_values(graphdef, params, ids, mask, P))
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, (2, P + N)).astype(np.int32)
    mask = np.ones((2, P + N), np.int32)
    mask[1, 0] = 0  # left-padded prompt
    mask[1, -1] = 0  # response ended before the last column
    used = np.asarray(used_values(ids, mask))
    full = np.asarray(full_values(ids, mask))
    assert used.shape == (2, N)
    for t in range(N):
        np.testing.assert_array_equal(used[:, t], full[:, P - 1 + t])
        other = ids.copy()
        other[:, P + t:] = (ids[:, P + t:] + 1 + rng.integers(0, vocab - 5, (2, N - t))) % vocab
        moved = np.asarray(used_values(other, mask))
        np.testing.assert_allclose(moved[:, :t + 1], used[:, :t + 1], rtol=1e-6, atol=1e-6)
        if t + 1 < N:  # the next state holds token t: its value moves
            assert np.all(np.abs(moved[0, t + 1:] - used[0, t + 1:]) > 0)
    with pytest.raises(ValueError, match="prompt"):
        ppo.response_values(jnp.asarray(full[:, :N]), 0, N)


def _k3(logp, ref):
    l = logp - ref
    return np.exp(-l) - 1 + l


@pytest.mark.parametrize("normalization", ["sum", "seq_mean"])
def test_kl_as_token_reward_returns_match_numpy(normalization):
    rng = np.random.default_rng(1)
    B, N, beta = 3, 5, 0.3
    lengths = np.array([5, 3, 1])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    logp = (rng.normal(size=(B, N)) * 0.5 - 1.0).astype(np.float32) * mask
    ref = (rng.normal(size=(B, N)) * 0.5 - 1.0).astype(np.float32) * mask
    values = rng.normal(size=(B, N)).astype(np.float32)
    R = np.array([1.0, 0.0, 1.0], np.float32)
    k = _k3(logp, ref) * mask
    if normalization == "seq_mean":
        k = k / lengths[:, None]
    args = [jnp.asarray(x) for x in (R, values, logp, ref, mask)]

    token = ppo.PPOSettings(placement="reward", beta=beta, estimator="k3", gamma=1.0, lam=1.0,
                            normalization=normalization, kl_as_token_reward=True,
                            whiten_advantages=False)
    adv, ret, token_r, penalty = ppo.advantages_and_returns(*args, token)
    # The return at the first token: R - beta * sum_t k_t.
    np.testing.assert_allclose(adv[:, 0] + values[:, 0], R - beta * k.sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[:, 0], R - beta * k.sum(-1), rtol=1e-5, atol=1e-6)
    # Every token: the reward to go, R - beta * sum_{l >= t} k_l; zero off the mask.
    to_go = np.flip(np.cumsum(np.flip(k, -1), -1), -1)
    np.testing.assert_allclose(ret, (R[:, None] - beta * to_go) * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, ret - values * mask, rtol=1e-5, atol=1e-6)
    # The per-token KL rewards add up to the per-sequence amount of kl_penalty.
    last = np.arange(N)[None] == lengths[:, None] - 1
    np.testing.assert_allclose((token_r - R[:, None] * last).sum(-1), -np.asarray(penalty.reward),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(token_r, (R[:, None] * last - beta * k) * mask, rtol=1e-5, atol=1e-6)

    # Per sequence (KL on the last token): the same return at t = 0, R - beta*S at every token.
    seq = ppo.PPOSettings(placement="reward", beta=beta, estimator="k3", gamma=1.0, lam=1.0,
                          normalization=normalization, kl_as_token_reward=False,
                          whiten_advantages=False)
    _, ret_seq, _, _ = ppo.advantages_and_returns(*args, seq)
    np.testing.assert_allclose(ret_seq[:, 0], ret[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret_seq, (R - beta * k.sum(-1))[:, None] * mask, rtol=1e-5,
                               atol=1e-6)

    # Placement "loss": no KL in the rewards; whitening changes the advantages, not the returns.
    loss = ppo.PPOSettings(placement="loss", beta=beta, kl_as_token_reward=True, gamma=1.0,
                           lam=1.0, normalization=normalization, whiten_advantages=True)
    adv_w, ret_l, _, _ = ppo.advantages_and_returns(*args, loss)
    np.testing.assert_allclose(ret_l, R[:, None] * mask, rtol=1e-6, atol=1e-6)
    n = mask.sum()
    assert abs(float((adv_w * mask).sum() / n)) < 1e-5
    np.testing.assert_allclose(float((adv_w ** 2 * mask).sum() / n), 1.0, rtol=1e-4)


def _optimizers():
    return optax.adam(1e-2), optax.adam(1e-2)


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _iteration(setup, settings):
    opt, critic_opt = _optimizers()
    iterate = ppo.make_iteration(setup["policy_graphdef"], setup["ref_params"],
                                 setup["critic_graphdef"], opt, critic_opt, setup["tokenizer"],
                                 settings)
    state = ppo.init_state(setup["policy_params"], setup["critic_params"], opt, critic_opt,
                           settings.staleness)
    return iterate, state


def test_one_iteration_updates_policy_and_critic(setup):
    settings = ppo.PPOSettings(placement="both", kl_as_token_reward=True, beta=0.1,
                               num_prompts=2, group_size=2, max_new_tokens=4, task_kwargs=TASK)
    iterate, state = _iteration(setup, settings)
    new, metrics = iterate(state, 1)
    assert int(new.step) == 1
    for key in ("loss", "kl_loss", "value_loss", "explained_variance", "value_mean", "reward",
                "kl_k3", "clip_frac", "grad_norm", "critic_grad_norm", "advantage_abs"):
        assert metrics[key].shape == (1,), key
    for key, value in metrics.items():
        assert np.all(np.isfinite(value)), key
    assert metrics["skipped"][0] == 0 and metrics["critic_skipped"][0] == 0
    assert metrics["kl_k3"][0] > 0 and metrics["kl_loss"][0] > 0  # the reference differs
    assert metrics["value_loss"][0] > 0
    assert _changed(new.params, state.params)
    assert _changed(new.critic_params, state.critic_params)
    assert new.stale == ()


def test_stale_rollouts_advance_the_queue(setup):
    settings = ppo.PPOSettings(placement="loss", staleness=1, beta=0.1, num_prompts=2,
                               group_size=2, max_new_tokens=4, task_kwargs=TASK, seed=3)
    iterate, state0 = _iteration(setup, settings)
    state1, m1 = iterate(state0, 1)
    state2, m2 = iterate(state1, 1)
    assert int(state2.step) == 2 and len(state2.stale) == 1
    # After each update the queue holds the parameters before it (the next behaviour policy).
    for before, after in ((state0, state1), (state1, state2)):
        for x, y in zip(jax.tree.leaves(after.stale[0]), jax.tree.leaves(before.params)):
            np.testing.assert_array_equal(x, y)
    assert _changed(state2.stale[0], state0.stale[0])
    # Iteration 2 samples with the initial parameters, one update behind: the ratio moves.
    assert m1["staleness_log_ratio"][0] < 1e-4
    assert m2["staleness_log_ratio"][0] > 1e-4
    for m in (m1, m2):
        for key, value in m.items():
            assert np.all(np.isfinite(value)), key


def test_both_placement_with_stale_rollouts_is_refused():
    with pytest.raises(ValueError, match="placement='both' with stale rollouts"):
        ppo.PPOSettings(placement="both", staleness=1)
    ppo.PPOSettings(placement="both", staleness=0)
    ppo.PPOSettings(placement="reward", staleness=2, kl_as_token_reward=True)
    with pytest.raises(ValueError, match="estimator"):
        ppo.PPOSettings(estimator="k4")
