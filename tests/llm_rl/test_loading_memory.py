"""Host memory of ``from_pretrained``: loading should hold at most one extra host copy of the
largest tensor (the aim in benchmarks/RESULTS.md, "LM zoo vs transformers").

Measured with tracemalloc (numpy buffers are traced; deterministic, unlike RSS): the peak of
traced host memory while loading, in units of the largest tensor. The loader used to hold 2.0
(tied embedding, Same rule) and 3.0 (untied lm_head, Linear rule) copies: ``astype`` copied
even when the dtype already matched and the transpose was materialised on the host. Now a
Same tensor costs one copy; a Linear one still costs two (safetensors' array and the
contiguous transposed copy jax makes of the transposed view), hence the strict xfail, which
turns into a failure the day the loader meets the aim.

tracemalloc does not see XLA's buffers, so a copy moved from numpy into XLA would pass it with
no memory saved: the second test measures the peak resident memory of a load in a fresh
process (file pages and the parameters themselves subtracted).
"""

import gc
import json
import os
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_rl.models import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained

VOCAB, HIDDEN = 16384, 256  # 16 MiB float32 embedding (and lm_head); everything else small


def _write_checkpoint(path, tie: bool, vocab: int = VOCAB) -> int:
    cfg = Qwen3Config.tiny(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64,
                           num_hidden_layers=1, tie_word_embeddings=tie)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    leaves = [(p, var.replace(jnp.asarray(rng.standard_normal(var.get_value().shape, dtype=np.float32))))
              for p, var in nnx.to_flat_state(state)]
    save_pretrained(nnx.merge(graphdef, nnx.from_flat_state(leaves)), cfg, path)
    return vocab * HIDDEN * 4


@pytest.mark.parametrize("tie", [
    True,
    pytest.param(False, marks=pytest.mark.xfail(
        strict=True, reason="a transposed (Linear) tensor still needs a contiguous host copy")),
], ids=["tied-embedding", "untied-lm-head"])
def test_loading_holds_at_most_one_extra_host_copy(tmp_path, tie):
    largest = _write_checkpoint(tmp_path, tie)
    jax.block_until_ready(nnx.state(from_pretrained(tmp_path)[0]))  # first calls, caches
    gc.collect()
    tracemalloc.start()
    try:
        model, _ = from_pretrained(tmp_path)
        jax.block_until_ready(nnx.state(model))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.25 * largest, (
        f"loading held {peak / largest:.2f}x the largest tensor in host memory at once (aim: at most 1; tolerance 0.25)")


# -- RSS: everything the process holds, XLA's buffers included ---------------------------------

_RSS_CHILD = r"""
import gc, json, os, sys
import jax
from flax import nnx
from llm_rl.models import from_pretrained

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out

path, warmup = sys.argv[1], sys.argv[2]
model, _ = from_pretrained(warmup)  # same family, tiny: code paths, caches and tracing warm
jax.block_until_ready(nnx.state(model))
del model
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status()
model, _ = from_pretrained(path)
jax.block_until_ready(nnx.state(model))
after = status()
params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
print(json.dumps({"peak_over_start": after["VmHWM"] - before["VmRSS"], "params": params}))
"""


def _rss_extra_copies(tmp_path, tie: bool) -> float:
    """Peak RSS of a second ``from_pretrained`` in a fresh process, less the loaded parameters
    and less the checkpoint file (mmapped page cache, not a copy the loader made), in units of
    the largest tensor. ``MALLOC_MMAP_THRESHOLD_`` sends every large allocation to its own mmap,
    so a freed buffer leaves RSS at once instead of staying in malloc's free lists."""
    largest = _write_checkpoint(tmp_path / "large", tie)
    _write_checkpoint(tmp_path / "warmup", tie, vocab=64)
    # no persistent compilation cache (tests/conftest.py sets one): reading its entries during
    # the load adds ~0.6 of a 16 MiB tensor here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "large"), str(tmp_path / "warmup")],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = sum(f.stat().st_size for f in (tmp_path / "large").glob("*.safetensors"))
    return (measured["peak_over_start"] - measured["params"] - file_bytes) / largest


@pytest.mark.parametrize("tie", [True, False], ids=["tied-embedding", "untied-lm-head"])
def test_loading_peak_rss_holds_at_most_one_extra_copy(tmp_path, tie):
    """The same aim measured as resident memory, so a copy moved out of numpy into XLA's own
    buffers (which tracemalloc does not see) still counts. Measured on this machine: 1.08
    (tied) and 1.05 (untied), the same in three runs each; the XLA-copy mutation also turns the
    strict xfail above into an XPASS, as feared. By resident memory the Linear case
    meets the aim that the tracemalloc test above marks as failing: numpy's peak there counts
    the contiguous copy of the transposed view that is then handed to XLA. Catches an extra
    XLA copy of each tensor (``np.asarray(jnp.asarray(host) + 0)`` in ``_place``: 2.50 tied,
    2.68 untied) and an extra numpy copy of each tensor (untied 2.05; tied 1.07, not caught)."""
    extra = _rss_extra_copies(tmp_path, tie)
    assert extra <= 1.25, (
        f"loading held {extra:.2f}x the largest tensor in resident memory beyond the parameters "
        "and the mmapped file (aim: at most 1; tolerance 0.25)")
