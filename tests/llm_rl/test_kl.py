"""llm_rl.kl: estimator values, penalty placement, and the exact gradient oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llm_rl.kl import estimate, kl_penalty
from llm_rl.kl import oracle as O

logit_vectors = st.lists(st.floats(-4, 4), min_size=2, max_size=6)


@settings(max_examples=50, deadline=None)
@given(l=st.floats(-20, 20, width=32, allow_subnormal=False))
def test_estimator_closed_forms(l):
    lp, rp = jnp.float32(l), jnp.float32(0.0)
    np.testing.assert_allclose(estimate(lp, rp, "k1"), l, rtol=1e-6)
    np.testing.assert_allclose(estimate(lp, rp, "k2"), l * l / 2, rtol=1e-5, atol=1e-30)
    k3 = float(estimate(lp, rp, "k3"))
    np.testing.assert_allclose(k3, np.expm1(-l) + l, rtol=1e-5, atol=1e-6)
    assert k3 >= 0.0  # k3 is a non-negative estimator


@settings(max_examples=50, deadline=None)
@given(p_logits=logit_vectors, seed=st.integers(0, 2**16))
def test_k1_and_k3_are_unbiased_for_categorical_kl(p_logits, seed):
    p_logits = np.asarray(p_logits)
    q_logits = np.random.default_rng(seed).normal(size=p_logits.shape) * 2
    logp, logq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    p = np.exp(logp)
    kl = float(np.sum(p * (logp - logq)))
    for est in ("k1", "k3"):  # E_{x~p}[k(x)] = KL(p || q), exactly
        np.testing.assert_allclose(np.sum(p * estimate(logp, logq, est)), kl, rtol=1e-4, atol=1e-6)


class KLPenaltyTest(chex.TestCase):
    def setUp(self):
        key = jax.random.key(0)
        self.logp = jax.random.normal(key, (3, 5)) - 2.0
        self.ref = jax.random.normal(jax.random.fold_in(key, 1), (3, 5)) - 2.0
        self.mask = jnp.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_values_for_each_placement_and_normalization(self):
        k = np.asarray(estimate(self.logp, self.ref, "k3")) * np.asarray(self.mask)
        lengths = np.asarray(self.mask).sum(1)
        expect_seq = {"sum": k.sum(1), "seq_mean": k.sum(1) / lengths, "token_mean": k.sum(1) / lengths}
        for norm in ("sum", "seq_mean", "token_mean"):
            for placement in ("reward", "loss", "both", "none"):
                fn = self.variant(lambda a, b, m: kl_penalty(a, b, m, estimator="k3", placement=placement,
                                                             beta=0.3, normalization=norm))
                pen = fn(self.logp, self.ref, self.mask)
                chex.assert_shape(pen.reward, (3,))
                np.testing.assert_allclose(pen.kl, expect_seq[norm], rtol=1e-5)
                want_reward = 0.3 * expect_seq[norm] if placement in ("reward", "both") else 0 * k.sum(1)
                np.testing.assert_allclose(pen.reward, want_reward, rtol=1e-5)
                if placement in ("loss", "both"):
                    want = k.sum() / lengths.sum() if norm == "token_mean" else expect_seq[norm].mean()
                    np.testing.assert_allclose(pen.loss, 0.3 * want, rtol=1e-5)
                else:
                    assert float(pen.loss) == 0.0

    def test_reward_is_detached_and_loss_is_not(self):
        def parts(logp):
            pen = kl_penalty(logp, self.ref, self.mask, estimator="k1", placement="both", beta=1.0)
            return jnp.sum(pen.reward), pen.loss
        g_reward = jax.grad(lambda x: parts(x)[0])(self.logp)
        g_loss = jax.grad(lambda x: parts(x)[1])(self.logp)
        assert float(jnp.abs(g_reward).max()) == 0.0
        # d/dlogp of mean_b sum_t m k1 = m / B
        np.testing.assert_allclose(g_loss, self.mask / 3, rtol=1e-6)

    def test_masked_tokens_do_not_matter(self):
        garbage = jnp.where(self.mask > 0, self.logp, 1e3)
        for est in ("k1", "k2", "k3"):
            a = kl_penalty(self.logp, self.ref, self.mask, estimator=est, placement="both", beta=1.0)
            b = kl_penalty(garbage, self.ref, self.mask, estimator=est, placement="both", beta=1.0)
            np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
            np.testing.assert_allclose(a.reward, b.reward, rtol=1e-6)

    def test_on_policy_behavior_same_loss_but_adds_the_score_term(self):
        # rho = 1 in value when the behaviour policy is the current one, so the losses agree;
        # the gradients do not: d(rho k)/dl = k + dk/dl for k1 and k3 (rho carries the per-token
        # score term k_t grad log pi_t), while k2 keeps dk/dl (its rho is detached). The
        # trainer therefore passes behavior_logp only for stale rollouts (see llm_rl.kl).
        b = self.logp.shape[0]
        l = self.logp - self.ref
        k = {"k1": l, "k2": 0.5 * l * l, "k3": jnp.expm1(-l) + l}
        dk = {"k1": jnp.ones_like(l), "k2": l, "k3": 1.0 - jnp.exp(-l)}
        for est in ("k1", "k2", "k3"):
            f = lambda lp, beh: kl_penalty(lp, self.ref, self.mask, estimator=est, placement="loss",
                                           beta=1.0, behavior_logp=beh).loss
            np.testing.assert_allclose(f(self.logp, self.logp), f(self.logp, None), rtol=1e-6)
            g_plain = jax.grad(lambda x: f(x, None))(self.logp)
            g_stale = jax.grad(lambda x: f(x, jax.lax.stop_gradient(x)))(self.logp)
            np.testing.assert_allclose(g_plain, self.mask * dk[est] / b, rtol=1e-5, atol=1e-7)
            score = 0.0 if est == "k2" else k[est]
            np.testing.assert_allclose(g_stale, self.mask * (dk[est] + score) / b, rtol=1e-5,
                                       atol=1e-7)
            if est != "k2":
                assert float(jnp.abs(g_stale - g_plain).max()) > 1e-3

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="estimator='k4'"):
            kl_penalty(self.logp, self.ref, self.mask, estimator="k4", placement="loss", beta=1.0)
        with pytest.raises(ValueError, match="placement"):
            kl_penalty(self.logp, self.ref, self.mask, estimator="k1", placement="both_ways", beta=1.0)
        with pytest.raises(ValueError, match="twice"):
            kl_penalty(self.logp, self.ref, self.mask, estimator="k1", placement="both", beta=1.0,
                       behavior_logp=self.logp)
        with pytest.raises(AssertionError):
            kl_penalty(self.logp, self.ref[:, :4], self.mask, estimator="k1", placement="loss", beta=1.0)


# --- the exact oracle ---------------------------------------------------------------------------


def test_enumeration_is_a_distribution():
    space = O.TinyPolicySpace(vocab=3, horizon=3)
    tokens, mask = space.enumerate()
    # EOS (token 0) at t=0: 1 sequence; at t=1: 2; at t=2: 4; no EOS within the horizon: 8.
    assert len(tokens) == 1 + 2 + 4 + 8
    assert len({tuple(t[m > 0]) for t, m in zip(tokens, mask)}) == len(tokens)
    theta = space.init(jax.random.key(0))
    np.testing.assert_allclose(float(jnp.sum(space.sequence_probs(theta, tokens, mask))), 1.0, rtol=1e-6)


def _analyze(cfg, horizon=3, vocab=3, off_policy=False, seed=0):
    with jax.enable_x64(True):
        space, theta, ref, behavior = O.default_problem(seed, vocab, horizon)
        return O.analyze(space, cfg, theta, ref, beta=0.7, behavior_theta=behavior if off_policy else None)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", [O.KLConfig("k1", "reward"), O.KLConfig("k1", "both"),
                                 O.KLConfig("k3", "both")], ids=lambda c: c.name)
def test_unbiased_configurations_match_true_gradient(cfg, seed):
    r = _analyze(cfg, seed=seed)
    assert r["relative_bias"] < 1e-6 and r["cosine"] > 1 - 1e-9


def test_biased_configurations_are_biased():
    assert _analyze(O.KLConfig("k1", "loss"))["expected_norm"] < 1e-9  # zero in expectation
    assert _analyze(O.KLConfig("k3", "reward"))["relative_bias"] > 0.3
    assert _analyze(O.KLConfig("k3", "loss"))["relative_bias"] > 0.1
    assert _analyze(O.KLConfig("k2", "both"))["relative_bias"] > 0.1
    assert _analyze(O.KLConfig("k1", "reward", "seq_mean"))["relative_bias"] > 0.1  # length-normalised
    # k2 in the loss is exact for a single token, biased once later tokens depend on earlier ones.
    assert _analyze(O.KLConfig("k2", "loss"), horizon=1, vocab=5)["relative_bias"] < 1e-6
    assert _analyze(O.KLConfig("k2", "loss"), horizon=3)["relative_bias"] > 0.05


def test_k3_in_loss_is_the_forward_kl_gradient_for_one_token():
    # E_pi[grad k3] = -sum_y ref(y) grad log pi(y) = grad KL(ref || pi): a closed form.
    with jax.enable_x64(True):
        space, theta, ref, _ = O.default_problem(3, vocab=5, horizon=1)
        grads, weights = O.per_sample_gradients(space, O.KLConfig("k3", "loss"), theta, ref)
        expected = jnp.einsum("n,n...->...", weights, grads)
        tokens, mask = space.enumerate()

        def forward_kl(th):
            r = space.sequence_probs(ref, tokens, mask)
            return jnp.sum(r * (jnp.log(r) - jnp.sum(space.token_logprobs(th, tokens, mask), -1)))

        np.testing.assert_allclose(expected, jax.grad(forward_kl)(theta), atol=1e-12)


def test_off_policy_corrections():
    # Sequence-level importance weights keep k1-in-reward unbiased off-policy.
    assert _analyze(O.KLConfig("k1", "reward"), off_policy=True)["relative_bias"] < 1e-6
    # Per-token corrected loss forms are unbiased for one token ...
    for est in ("k1", "k2", "k3"):
        assert _analyze(O.KLConfig(est, "loss"), horizon=1, vocab=5, off_policy=True)["relative_bias"] < 1e-6
    # ... but not for longer sequences, where prefixes come from the behaviour policy.
    assert _analyze(O.KLConfig("k3", "loss"), off_policy=True)["relative_bias"] > 0.05
    # Truncating rho trades bias for variance.
    full = _analyze(O.KLConfig("k1", "loss"), horizon=1, vocab=5, off_policy=True)
    cut = _analyze(O.KLConfig("k1", "loss", rho_truncation=1.0), horizon=1, vocab=5, off_policy=True)
    assert cut["relative_bias"] > 1e-3 and cut["variance"] < full["variance"]


def test_monte_carlo_agrees_with_exact_moments():
    with jax.enable_x64(True):
        space, theta, ref, _ = O.default_problem(0)
        cfg = O.KLConfig("k3", "both")
        exact = O.analyze(space, cfg, theta, ref)
        n = 20000
        mean, var = O.sampled_moments(space, cfg, theta, ref, jax.random.key(1), n)
        true = O.true_gradient(space, theta, ref).reshape(-1)
        # The MC mean is within 5 standard errors of the (unbiased) true gradient.
        assert float(jnp.linalg.norm(mean - true)) < 5 * np.sqrt(exact["variance"] / n)
        np.testing.assert_allclose(float(var), exact["variance"], rtol=0.05)


def test_table_lists_every_configuration():
    with jax.enable_x64(True):
        text = O.table()
    lines = text.splitlines()
    assert len(lines) == 2 + 3 * 3 * 3
    seen = set()
    for line in lines[2:]:
        est, placement, norm, bias, cos, var = [c.strip() for c in line.strip("|").split("|")]
        seen.add((est, placement, norm))
        assert float(bias) >= 0 and float(var) >= 0
        assert cos.startswith("n/a") or -1.0 - 1e-9 <= float(cos) <= 1.0 + 1e-9
    assert seen == {(e, p, n) for e in ("k1", "k2", "k3") for p in ("reward", "loss", "both")
                    for n in ("sum", "seq_mean", "token_mean")}
