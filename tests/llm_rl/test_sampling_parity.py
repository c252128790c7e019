"""Greedy generation with the KV cache equals transformers' greedy ``generate`` on the same
weights (left-padded prompts, each family)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402

from llm_rl.models import from_pretrained  # noqa: E402
from llm_rl.sampling import generate  # noqa: E402
from tests.llm_rl.test_models_hf_parity import VOCAB, _hf_model  # noqa: E402


@pytest.mark.parametrize("case", ["qwen2-untied-bias", "qwen3-tied", "llama-llama3-rope"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    hf = _hf_model(case, seed=1)
    hf.save_pretrained(tmp_path)
    model, _ = from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :5] = 0
    ids[mask == 0] = 0
    n = 8
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:].numpy()
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=n, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
