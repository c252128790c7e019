"""llm_rl.ppo.make_iteration applies the gradients of the objectives it documents.

On a frozen rollout (rebuilt with ``rollout``), one SGD(lr=1) step of the policy and one of
the critic must equal minus ``jax.grad`` of objectives written here from the equations,
independently of llm_rl.algorithms / llm_rl.kl / llm_rl.ppo's pure pieces:

    r_t      = R [t last] - beta_r S [t last]                 S = sum_t m_t k(l_t)
    V_t      = critic output at position P-1+t (old values, detached)
    A_t      = GAE(gamma, lam) of r and V, a python loop; A_hat = whiten(A) over the mask
    J_policy = -sum_bt m ratio A_hat / sum m  +  beta_l mean_b sum_t m k(l_t)
    J_critic = 0.5 sum_bt m (V_t - (A_t + V_old_t))^2 / sum m     (value clip idle at V = V_old)

A flipped sign, a dropped term, or the critic regressing on the wrong target fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tokenizers")

from llm_rl import ppo, rl, tasks  # noqa: E402
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM, ValueModel  # noqa: E402
from llm_rl.tokenization import char_tokenizer  # noqa: E402
from tests.llm_rl.model_helpers import random_model  # noqa: E402
from tests.llm_rl.test_rl_gradients import _flat, _k, _logp  # noqa: E402

BETA, GAMMA, LAM = 0.5, 0.9, 0.8


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=8,
                           num_hidden_layers=1, eos_token_id=(tok.eos_token_id,))
    graphdef, params = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=0, noise=0.3), nnx.Param)
    _, ref = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=1, noise=0.3), nnx.Param)
    c_graphdef, c_params = nnx.split(random_model(ValueModel, cfg, seed=2, noise=0.3), nnx.Param)
    return tok, graphdef, params, ref, c_graphdef, c_params


@pytest.fixture(autouse=True)
def pseudo_reward(monkeypatch):
    monkeypatch.setattr(tasks, "grade", lambda text, problem: float(len(text) % 2 == 0))


def _gae_loop(r, v, m):
    r, v, m = (np.asarray(x, np.float64) for x in (r, v, m))
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        nxt_a = 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t] == 0:
                nxt_a = 0.0
                continue
            nxt_v = v[b, t + 1] if t + 1 < r.shape[1] and m[b, t + 1] else 0.0
            nxt_m = m[b, t + 1] if t + 1 < r.shape[1] else 0.0
            delta = r[b, t] + GAMMA * nxt_v - v[b, t]
            adv[b, t] = delta + GAMMA * LAM * nxt_m * nxt_a
            nxt_a = adv[b, t]
    return adv


@pytest.mark.parametrize("estimator, placement", [("k3", "reward"), ("k3", "loss"),
                                                  ("k1", "both")])
def test_applied_steps_are_the_gradients_of_the_documented_objectives(setup, estimator,
                                                                      placement):
    tok, graphdef, params, ref, c_graphdef, c_params = setup
    s = ppo.PPOSettings(estimator=estimator, placement=placement, beta=BETA, gamma=GAMMA,
                        lam=LAM, num_prompts=2, group_size=4, max_new_tokens=6,
                        task_kwargs=(("max_value", 9),))
    sgd = optax.sgd(1.0)
    iterate = ppo.make_iteration(graphdef, ref, c_graphdef, sgd, sgd, tok, s)
    state, metrics = iterate(ppo.init_state(params, c_params, sgd, sgd, 0), 1)
    assert int(metrics["skipped"][0]) == 0 and int(metrics["critic_skipped"][0]) == 0

    r = rl.rollout(graphdef, params, tok, s, 0)
    n = r.resp_mask.shape[1]
    p_len = r.sequences.shape[1] - n
    m = np.asarray(r.resp_mask, np.float64)
    assert float(jnp.std(r.rewards)) > 0
    ref_logp = _logp(graphdef, ref, r.sequences, r.seq_mask, n)
    logp0 = _logp(graphdef, params, r.sequences, r.seq_mask, n)

    def values(cp):
        out = nnx.merge(c_graphdef, cp)(r.sequences, r.seq_mask)
        return out[:, p_len - 1:p_len - 1 + n]

    v_old = np.asarray(values(c_params), np.float64) * m
    k0 = np.asarray(_k(logp0 - ref_logp, estimator), np.float64)
    seq_kl = (m * k0).sum(-1)
    last = (m * np.arange(n)).argmax(-1)
    token_r = np.zeros_like(m)
    beta_r = BETA if placement in ("reward", "both") else 0.0
    token_r[np.arange(len(last)), last] = np.asarray(r.rewards) - beta_r * seq_kl
    adv = _gae_loop(token_r, v_old, m)
    mean = (adv * m).sum() / m.sum()
    var = (((adv - mean) ** 2) * m).sum() / m.sum()
    adv_hat = jnp.asarray((adv - mean) / np.sqrt(var + 1e-8) * m, jnp.float32)
    returns = jnp.asarray(adv + v_old, jnp.float32)
    mj = jnp.asarray(m, jnp.float32)
    beta_l = BETA if placement in ("loss", "both") else 0.0

    def j_policy(p):
        logp = _logp(graphdef, p, r.sequences, r.seq_mask, n)
        ratio = jnp.exp(logp - jax.lax.stop_gradient(r.behavior_logp))
        pg = -(mj * ratio * adv_hat).sum() / mj.sum()
        return pg + beta_l * jnp.mean((mj * _k(logp - ref_logp, estimator)).sum(-1))

    def j_critic(cp):
        return 0.5 * (mj * (values(cp) - returns) ** 2).sum() / mj.sum()

    for new, old, objective in ((state.params, params, j_policy),
                                (state.critic_params, c_params, j_critic)):
        applied = _flat(jax.tree.map(lambda a, b: a - b, old, new))
        want = _flat(jax.grad(objective)(old))
        assert np.linalg.norm(want) > 1e-4
        np.testing.assert_allclose(applied, want, atol=2e-4 * np.abs(want).max(), rtol=2e-3)
