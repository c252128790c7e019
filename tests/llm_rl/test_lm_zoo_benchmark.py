"""benchmarks/lm_zoo.py's baselines still run against the library and compute what it does:
the previous seq-major sampling path gives the library's greedy tokens, and a step traced
under ``autodiff_contract`` (JAX's own tensordot gradient) gives the library's gradient. Both
call library internals, so a change of signature there breaks the benchmark, not just a
number in it (the sampling part once failed after ``_generate`` gained arguments)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.lm_zoo import autodiff_contract, make_previous_generate
from llm_rl.models import Qwen3Config, Qwen3ForCausalLM
from llm_rl.sampling import generate


def _model():
    cfg = Qwen3Config.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    return Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(3))


def test_previous_sampling_path_gives_the_library_tokens():
    model = _model()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (3, 16)), jnp.int32)  # 16: a bucket width, as in the benchmark
    mask = jnp.ones_like(ids)
    key = jax.random.key(1)
    ours = generate(model, ids, mask, key, max_new_tokens=6, greedy=True).tokens
    previous = make_previous_generate()(model, ids, mask, key, max_new_tokens=6, greedy=True).tokens
    np.testing.assert_array_equal(np.asarray(previous), np.asarray(ours))


def test_autodiff_contract_baseline_has_the_library_gradient():
    model = _model()
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids)[:, :-1]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1).mean()

    library = jax.jit(jax.grad(loss))(params)
    with autodiff_contract():
        baseline = jax.jit(jax.grad(loss)).lower(params).compile()(params)
    for a, b in zip(jax.tree.leaves(library), jax.tree.leaves(baseline)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
