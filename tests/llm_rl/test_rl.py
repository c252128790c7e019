"""llm_rl.rl: one RL iteration end to end on a tiny model (sampler/learner consistency)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tokenizers")

from llm_rl.models import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from llm_rl.rl import RLSettings, init_state, make_iteration, sample_problems  # noqa: E402
from llm_rl.tokenization import char_tokenizer, encode_prompts  # noqa: E402
from tests.llm_rl.model_helpers import random_model  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=8,
                           num_hidden_layers=1, eos_token_id=(tok.eos_token_id,))
    model = random_model(Qwen3ForCausalLM, cfg, seed=0, noise=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    # A reference that differs from the initial policy, so the KL terms have gradients even
    # when a random policy earns no reward.
    _, ref = nnx.split(random_model(Qwen3ForCausalLM, cfg, seed=1, noise=0.3), nnx.Param)
    return tok, graphdef, params, ref


def _run(setup, n=2, **kw):
    tok, graphdef, params, ref = setup
    settings = RLSettings(num_prompts=2, group_size=2, max_new_tokens=6, task_kwargs=(("max_value", 9),), **kw)
    opt = optax.adam(1e-2)
    iterate = make_iteration(graphdef, ref, opt, tok, settings)
    state = init_state(params, opt, settings.staleness)
    return iterate(state, n), params


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_learner_log_probs_equal_the_samplers(setup, temperature):
    (state, metrics), params = _run(setup, n=1, temperature=temperature, placement="both", estimator="k3")
    # The learner's log-probs of the sampled tokens equal the sampler's: ratio 1 on-policy,
    # also when the temperature is not 1.
    assert metrics["staleness_log_ratio"][0] < 1e-4
    assert all(np.all(np.isfinite(v)) for v in metrics.values())
    changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    assert changed and int(state.step) == 1


def test_stale_rollouts_come_from_older_parameters(setup):
    (state, metrics), params = _run(setup, n=3, staleness=2, placement="loss", estimator="k3")
    # The first two iterations sample from the initial parameters; by the third the policy
    # has moved away from its behaviour policy.
    assert metrics["staleness_log_ratio"][0] < 1e-4 and metrics["staleness_log_ratio"][2] > 1e-4
    assert len(state.stale) == 2


def test_settings_and_prompts():
    with pytest.raises(ValueError, match="twice"):
        RLSettings(staleness=1, placement="both")
    s = RLSettings(num_prompts=3, seed=5)
    assert sample_problems(s, 7) == sample_problems(s, 7) != sample_problems(s, 8)
    ids, mask = encode_prompts(char_tokenizer(), ["ab", "abcdefg"], pad_to_multiple=16)
    assert ids.shape == (2, 16) and mask.sum() == 3 + 8
