"""llm_rl.rl.make_iteration applies the gradient of the objective it documents.

On a frozen rollout (the iteration's own prompts and samples, rebuilt with ``rollout``), the
parameter change of one SGD(lr=1) step must equal minus ``jax.grad`` of an objective written
here from the equations, independently of llm_rl.algorithms / llm_rl.kl:

    A_b   = GRPO((R_b - beta_r * sg(S_b)))             S_b = sum_t m_bt k(l_bt),  l = log pi - log ref
    J_pg  = -mean_b 1/|o_b| sum_t m_bt exp(log pi_bt - sg(log mu_bt)) A_b      (ratio ~ 1: clip idle)
    J_kl  = beta_l * mean_b sum_t m_bt w_bt k(l_bt),  w = 1 on-policy, w = pi / sg(mu) when stale

with beta_r = beta for placement reward/both, beta_l = beta for loss/both. A flipped sign, a
``+penalty`` or a dropped term changes the applied step. The verifier is replaced by a
deterministic pseudo-reward so a random tiny policy gets non-zero advantages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tokenizers")

from llm_rl import rl, tasks  # noqa: E402
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from llm_rl.tokenization import char_tokenizer  # noqa: E402
from tests.llm_rl.model_helpers import random_model  # noqa: E402

BETA = 0.5
GROUP = 4


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=8,
                           num_hidden_layers=1, eos_token_id=(tok.eos_token_id,))
    _, params = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=0, noise=0.3), nnx.Param)
    graphdef, ref = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=1, noise=0.3), nnx.Param)
    return tok, graphdef, params, ref


@pytest.fixture(autouse=True)
def pseudo_reward(monkeypatch):
    # 1 when the response has an even number of characters: varies within every group
    monkeypatch.setattr(tasks, "grade", lambda text, problem: float(len(text) % 2 == 0))


def _logp(graphdef, params, sequences, seq_mask, n_resp):
    """log pi(response tokens) [B, N], straight from the logits."""
    logits = nnx.merge(graphdef, params)(sequences, seq_mask)
    logp = jax.nn.log_softmax(logits[:, -n_resp - 1:-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, sequences[:, -n_resp:, None], axis=-1)[..., 0]


def _k(l, estimator):
    return {"k1": l, "k2": 0.5 * l * l, "k3": jnp.exp(-l) - 1.0 + l}[estimator]


def _objective(graphdef, ref, r, estimator, placement, stale):
    n = r.resp_mask.shape[1]
    m = r.resp_mask.astype(jnp.float32)
    ref_logp = _logp(graphdef, ref, r.sequences, r.seq_mask, n)
    mu = r.behavior_logp
    beta_r = BETA if placement in ("reward", "both") else 0.0
    beta_l = BETA if placement in ("loss", "both") else 0.0

    def objective(params):
        logp = _logp(graphdef, params, r.sequences, r.seq_mask, n)
        k = _k(logp - ref_logp, estimator)
        s = jax.lax.stop_gradient((m * k).sum(-1))
        shaped = (r.rewards - beta_r * s).reshape(-1, GROUP)
        adv = ((shaped - shaped.mean(1, keepdims=True))
               / (shaped.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
        ratio = jnp.exp(logp - jax.lax.stop_gradient(mu))
        j_pg = -jnp.mean((m * ratio * adv[:, None]).sum(-1) / m.sum(-1))
        w = ratio if stale else 1.0
        j_kl = beta_l * jnp.mean((m * w * k).sum(-1))
        return j_pg + j_kl, (j_pg, j_kl)

    return objective


def _applied_and_expected(setup, estimator, placement, staleness=0):
    tok, graphdef, params, ref = setup
    settings = rl.RLSettings(estimator=estimator, placement=placement, beta=BETA,
                             num_prompts=2, group_size=GROUP, max_new_tokens=6,
                             task_kwargs=(("max_value", 9),), staleness=staleness)
    opt = optax.sgd(1.0)
    iterate = rl.make_iteration(graphdef, ref, opt, tok, settings)
    state, metrics = iterate(rl.init_state(params, opt, staleness), 1)
    assert int(metrics["skipped"][0]) == 0
    applied = jax.tree.map(lambda a, b: a - b, params, state.params)  # = lr * grad
    frozen = rl.rollout(graphdef, params, tok, settings, 0)  # what iterate sampled at step 0
    assert float(jnp.std(frozen.rewards)) > 0, "pseudo-reward gave no advantage"
    objective = _objective(graphdef, ref, frozen, estimator, placement, stale=staleness > 0)
    expected, _ = jax.grad(objective, has_aux=True)(params)
    return applied, expected, objective, params


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("estimator, placement, staleness", [
    ("k3", "reward", 0), ("k3", "both", 0), ("k1", "loss", 0), ("k3", "none", 0), ("k3", "loss", 1),
])
def test_applied_step_is_the_gradient_of_the_documented_objective(setup, estimator, placement,
                                                                   staleness):
    applied, expected, objective, params = _applied_and_expected(setup, estimator, placement,
                                                                 staleness)
    a, e = _flat(applied), _flat(expected)
    assert np.linalg.norm(e) > 1e-3
    np.testing.assert_allclose(a, e, atol=2e-4 * np.abs(e).max(), rtol=2e-3)
    # each term of the objective is really exercised (else a flipped sign could hide in it)
    g_pg = _flat(jax.grad(lambda p: objective(p)[1][0])(params))
    g_kl = _flat(jax.grad(lambda p: objective(p)[1][1])(params))
    assert np.linalg.norm(g_pg) > 0.05 * np.linalg.norm(e)
    if placement in ("loss", "both"):
        assert np.linalg.norm(g_kl) > 0.05 * np.linalg.norm(e)
        # a flipped KL-loss sign would move the step by 2 * g_kl: far outside the tolerance
        assert np.abs(a - (e - 2 * g_kl)).max() > 10 * 2e-4 * np.abs(e).max()
