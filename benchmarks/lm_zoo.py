"""The LM zoo against transformers on PyTorch: sampling, training, MFU, one RL iteration,
and the host memory of checkpoint loading.

Both sides run the same weights: a random Qwen3 checkpoint is built with transformers
(``Qwen3ForCausalLM``, float32), saved, and loaded with ``llm_rl.models.from_pretrained``;
the in-memory transformers model is the peer. PyTorch gets as many intra-op threads as
XLA's CPU client uses (one per CPU this process may run on). Speeds are medians over
repeats with the variants interleaved within each repeat, and every "ratio" is against a
peer timed in the same process (absolute speeds on shared machines drift).

1. Sampling tokens/s (new tokens only; prompt 32, 64 new tokens, no EOS so every row
   generates the full length): ``llm_rl.sampling.generate`` (jitted; compile time reported
   separately) against ``model.generate`` (``min_new_tokens`` = ``max_new_tokens``), greedy
   on both sides (the headline) and temperature sampling on both sides. A "previous path"
   row runs our ``generate`` with the cache of the library before 2026-12-06 (sequence-major
   [L, B, S, K, H], see ``forward_cached_seq_major``) and checks its tokens equal the
   library's head-major path.
2. Training tokens/s: one forward + backward + AdamW step on next-token loss, ours (pure
   jitted step over the params pytree, optax.adamw, buffers donated; plain cross-entropy,
   ``llm_rl.sft.chunked_token_nll`` over chunks of tokens, and the plain step traced with
   JAX's own ``tensordot`` gradient instead of ``trainkit.nn.layers.contract``'s CPU rule)
   against PyTorch (same model, torch.optim.AdamW).
3. MFU of our training step: ``(6 * N * tokens + 12 * L * heads * head_dim * T * tokens) /
   step_time / peak``, N the parameters that enter matmuls (kernels, and the embedding once
   as the tied output projection), peak the median FLOP/s of a jitted float32 matmul.
4. One RL iteration (``llm_rl.rl.make_iteration``, char tokenizer, tiny model): absolute.
5. Checkpoint loading memory: peak host memory of ``from_pretrained`` in a child process,
   in units of the largest tensor.

    PYTHONPATH=. .venv/bin/python benchmarks/lm_zoo.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CPUS = len(os.sched_getaffinity(0))
DEFAULT_RL = dict(num_prompts=16, group_size=4, max_new_tokens=24)  # kl_estimators' cpu preset


def interleaved_rates(fns: dict, work: dict, repeats: int) -> dict:
    """{name: [work[name] / seconds of each call]}, the calls interleaved within each repeat."""
    rates = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            rates[name].append(work[name] / (time.perf_counter() - start))
    return rates


def median_rates(fns: dict, work: dict, repeats: int) -> dict:
    return {name: statistics.median(v) for name, v in interleaved_rates(fns, work, repeats).items()}


# --- models -------------------------------------------------------------------------------


def build_pair(path: Path, *, hidden: int, inter: int, layers: int, heads: int, kv: int,
               head_dim: int, vocab: int, seed: int = 0):
    """(transformers model, our model, our config) with identical float32 weights."""
    import torch
    import transformers

    from llm_rl.models import from_pretrained

    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.05,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(cfg).float().eval()
    hf.save_pretrained(path)
    ours, ours_cfg = from_pretrained(path)
    return hf, ours, ours_cfg


def matmul_params(params) -> int:
    """Parameters that enter a matmul: every leaf with ndim >= 2 (kernels; the embedding,
    counted once because it is the tied output projection)."""
    import jax

    return int(sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2))


# --- 1. sampling --------------------------------------------------------------------------


def forward_cached_seq_major(model, ids, positions, key_mask, cache, write_index):
    """The library's ``forward_cached`` as it was until 2026-12-06: cache [L, B, S, K, H]
    (slots before heads), updated in place, each layer's slice attended by
    ``trainkit.nn.layers.dot_product_attention`` (whose dots transpose the cache slice)."""
    import jax
    import jax.numpy as jnp

    from llm_rl.models.layers import causal_padding_mask
    from llm_rl.sampling import KVCache

    decoder = model.model
    mask = causal_padding_mask(key_mask, ids.shape[1], write_index)
    x = decoder.embed_tokens(ids.astype(jnp.int32))
    ck, cv = cache.k, cache.v
    zero = jnp.zeros((), jnp.int32)
    w = jnp.asarray(write_index, jnp.int32)
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), positions)
        at = (jnp.int32(i), zero, w, zero, zero)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
        x = x + attn.attend(q, ck[i], cv[i], mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = decoder.norm(x)
    logits = (decoder.embed_tokens.attend(h) if model.lm_head is None
              else model.lm_head(h, out_dtype=jnp.float32))
    return logits, KVCache(ck, cv)


def init_cache_seq_major(cfg, batch, slots, dtype):
    import jax.numpy as jnp

    from llm_rl.sampling import KVCache

    shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def make_previous_generate():
    """``generate`` on the previous seq-major cache: ``sampling._generate``'s Python function
    rebuilt over a copy of the module globals with ``init_cache`` / ``forward_cached``
    swapped (a new function object, so neither jit's trace cache nor the module is touched).
    Prompts go in unbucketed (the benchmark's prompt width is a bucket width anyway)."""
    import types

    import jax
    from flax import nnx

    from llm_rl import sampling

    body = sampling._generate.__wrapped__
    scope = {**body.__globals__, "forward_cached": forward_cached_seq_major,
             "init_cache": init_cache_seq_major}
    fn = types.FunctionType(body.__code__, scope, body.__name__, body.__defaults__, body.__closure__)
    jitted = jax.jit(fn, static_argnums=(0, 6, 7, 8, 9, 10, 11, 12, 13))

    def generate_previous(model, ids, mask, key, *, max_new_tokens, greedy=False, temperature=1.0):
        graphdef, params = nnx.split(model)
        row_ids = np.zeros(ids.shape[:1], np.int32)  # one stream for the batch, as generate's default
        return jitted(graphdef, params, ids, mask, key, row_ids, max_new_tokens, float(temperature),
                      None, None, bool(greedy), (), 0, False)

    return generate_previous


def bench_sampling(hf, ours, vocab: int, batch: int, prompt_len: int, new: int, repeats: int,
                   temperature: float = 0.7) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from llm_rl.sampling import generate

    rng = np.random.default_rng(batch)
    ids = rng.integers(1, vocab, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    key = jax.random.key(0)
    gen_previous = make_previous_generate()

    def hf_generate(**kw):
        with torch.inference_mode():
            return hf.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=0, eos_token_id=None, **kw)

    fns = {
        "ours greedy": lambda: jax.block_until_ready(
            generate(ours, ids_j, mask_j, key, max_new_tokens=new, greedy=True).tokens),
        "hf greedy": lambda: hf_generate(do_sample=False),
        f"ours T={temperature}": lambda: jax.block_until_ready(
            generate(ours, ids_j, mask_j, key, max_new_tokens=new, temperature=temperature).tokens),
        f"hf T={temperature}": lambda: hf_generate(do_sample=True, temperature=temperature,
                                                  top_k=0, top_p=1.0),
        "ours greedy, previous seq-major cache": lambda: jax.block_until_ready(
            gen_previous(ours, ids_j, mask_j, key, max_new_tokens=new, greedy=True).tokens),
    }
    first = {}
    for name, fn in fns.items():  # compile (ours) / warm up (hf)
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    rates = median_rates(fns, {n: batch * new for n in fns}, repeats)
    # Sanity: the same greedy tokens (random weights make near-ties, so report agreement).
    ours_tok = np.asarray(generate(ours, ids_j, mask_j, key, max_new_tokens=new, greedy=True).tokens)
    prev_tok = np.asarray(gen_previous(ours, ids_j, mask_j, key, max_new_tokens=new, greedy=True).tokens)
    hf_tok = hf_generate(do_sample=False)[:, prompt_len:].numpy()
    compile_s = {n: first[n] - batch * new / rates[n] for n in fns if n.startswith("ours")}
    return dict(rates=rates, compile_s=compile_s, hf_new_tokens=int(hf_tok.shape[1]),
                greedy_agreement=float((ours_tok == hf_tok).mean()) if hf_tok.shape == ours_tok.shape else 0.0,
                previous_equal=bool((ours_tok == prev_tok).all()))


def bench_decode_step(ours, batch: int, slots: int, repeats: int, steps: int = 20) -> dict:
    """ms per jitted single decoding step (one token for ``batch`` rows against a cache of
    ``slots``), called ``steps`` times per repeat: the library's ``forward_cached`` (head-major
    cache), the previous seq-major one, the library's with the attention core replaced by the
    identity on q (patched while tracing only), and the step's matmuls alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llm_rl import sampling

    cfg = ours.config
    graphdef, params = nnx.split(ours)
    key_mask = jnp.ones((batch, slots), jnp.int32)
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), slots // 2, jnp.int32)
    seq_major = init_cache_seq_major(cfg, batch, slots, jnp.float32)
    head_major = sampling.init_cache(cfg, batch, slots, jnp.float32)

    def stepper(forward, cache, no_attention=False):
        fn = jax.jit(lambda p, c, w: forward(nnx.merge(graphdef, p), tok, pos, key_mask, c, w))
        state = {"c": cache}
        original = sampling.attend_cache
        if no_attention:
            sampling.attend_cache = lambda q, k, v, mask: q
        try:
            jax.block_until_ready(fn(params, state["c"], jnp.int32(0)))  # trace + compile
        finally:
            sampling.attend_cache = original

        def run():
            for i in range(steps):
                logits, state["c"] = fn(params, state["c"], jnp.int32(slots // 2 + i % (slots // 2)))
            jax.block_until_ready(logits)
        return run

    def matmuls(p, x):  # the GEMMs of one decoding step, nothing else
        m = nnx.merge(graphdef, p)
        h = m.model.embed_tokens(x)
        for layer in m.model.layers:
            a = layer.self_attn
            q = a.q_proj(h)
            h = h + a.o_proj(q) + a.k_proj(h).sum() + a.v_proj(h).sum()
            h = h + layer.mlp(h)
        return m.model.embed_tokens.attend(h)

    mm = jax.jit(matmuls)
    jax.block_until_ready(mm(params, tok))

    def run_matmuls():
        for _ in range(steps):
            out = mm(params, tok)
        jax.block_until_ready(out)

    fns = {
        "library forward_cached (head-major [L,B,K,S,H])": stepper(sampling.forward_cached, head_major),
        "previous seq-major [L,B,S,K,H]": stepper(forward_cached_seq_major, seq_major),
        "library, attention core removed": stepper(sampling.forward_cached, head_major, no_attention=True),
        "the step's matmuls alone": run_matmuls,
    }
    rates = median_rates(fns, {k: steps for k in fns}, repeats)
    return {k: 1e3 / v for k, v in rates.items()}


# --- 2./3. training and MFU ---------------------------------------------------------------


def matmul_peak_fns(n: int) -> tuple[dict, float]:
    """Calls of a jitted float32 [n, n] x [n, n] matmul (jax) and torch.mm; FLOPs per call."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    at, bt = torch.randn(n, n), torch.randn(n, n)
    fns = {"peak jax": lambda: jax.block_until_ready(mm(a, b)), "peak torch": lambda: torch.mm(at, bt)}
    for fn in fns.values():
        fn()
    return fns, 2.0 * n ** 3


AUTODIFF = "ours, autodiff dW (before 2026-12-07)"


@contextlib.contextmanager
def autodiff_contract():
    """Trace the dense layers with JAX's own gradient of ``tensordot`` instead of
    ``trainkit.nn.layers.contract``'s custom CPU rule (the library before 2026-12-07)."""
    import jax.numpy as jnp

    from trainkit.nn import layers

    saved = layers.contract
    layers.contract = lambda x, kernel, n_in, out_dtype=None: jnp.tensordot(
        x, kernel, axes=n_in, preferred_element_type=out_dtype)
    try:
        yield
    finally:
        layers.contract = saved


def bench_training(hf, ours, cfg, batch: int, seq: int, steps: int, repeats: int,
                   peak_n: int = 2048, ce_chunk: int = 256) -> dict:
    """Tokens/s of both training steps and, measured in the same interleaved repeats (so the
    machine's load is the same), the matmul peaks; MFU is taken per repeat, then the median."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    from llm_rl.sft import chunked_token_nll, output_projection

    lr, wd = 1e-4, 0.01
    graphdef, params = nnx.split(ours, nnx.Param)
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    ids_j = jnp.asarray(ids)
    ids_t = torch.as_tensor(ids, dtype=torch.long)

    def loss_fn(p, x):
        logits = nnx.merge(graphdef, p)(x)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1).mean()

    def loss_chunked(p, x):  # the same loss, the vocabulary projection in chunks of tokens
        m = nnx.merge(graphdef, p)
        h = m.model(x)[:, :-1]
        w = jnp.ones(x[:, 1:].shape, jnp.float32)
        return chunked_token_nll(h, output_projection(m), x[:, 1:], w, ce_chunk) / w.size

    @jax.jit
    def first_loss(p, x):
        return loss_fn(p, x), loss_chunked(p, x)

    def make_step(loss):
        def step(p, s, x):
            value, g = jax.value_and_grad(loss)(p, x)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, value
        return jax.jit(step, donate_argnums=(0, 1))

    steps_jit = {"ours": make_step(loss_fn), "ours chunked CE": make_step(loss_chunked),
                 AUTODIFF: make_step(loss_fn)}
    carries = {k: {"p": jax.tree.map(jnp.array, params), "s": tx.init(params)} for k in steps_jit}
    hf_model = hf.train()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    plain, chunked = first_loss(params, ids_j)
    losses = {"ours": float(plain), "ours chunked CE": float(chunked)}
    with torch.no_grad():
        losses["torch"] = float(hf_model(input_ids=ids_t, labels=ids_t).loss)

    def run_ours(name):
        carry, step_jit = carries[name], steps_jit[name]

        def run():
            for _ in range(steps):
                carry["p"], carry["s"], loss = step_jit(carry["p"], carry["s"], ids_j)
            jax.block_until_ready(loss)
        return run

    def run_torch():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            hf_model(input_ids=ids_t, labels=ids_t).loss.backward()
            opt.step()

    compile_s = {}
    for name, step_jit in steps_jit.items():
        start = time.perf_counter()
        c = carries[name]
        with (autodiff_contract() if name == AUTODIFF else contextlib.nullcontext()):  # traced here
            c["p"], c["s"], _ = jax.block_until_ready(step_jit(c["p"], c["s"], ids_j))
        compile_s[name] = time.perf_counter() - start
    run_torch()
    peak_fns, peak_flops = matmul_peak_fns(peak_n)
    sides = ("ours", "ours chunked CE", AUTODIFF, "torch")
    fns = {**{k: run_ours(k) for k in steps_jit}, "torch": run_torch, **peak_fns}
    work = {**{k: steps * batch * seq for k in sides}, **{k: peak_flops for k in peak_fns}}
    raw = interleaved_rates(fns, work, repeats)
    hf.eval()
    n = matmul_params(params)
    flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    mfu = {f"{side} vs {peak}": statistics.median(
        t * flops_per_token / pk for t, pk in zip(raw[side], raw[f"peak {peak}"]))
        for side in sides for peak in ("jax", "torch")}
    return dict(rates={k: statistics.median(v) for k, v in raw.items()}, mfu=mfu, sides=sides,
                compile_s=compile_s, initial_loss=losses, n_matmul=n, flops_per_token=flops_per_token)


# --- 4. one RL iteration ------------------------------------------------------------------


def bench_rl(iterations: int, hidden: int = 128, layers: int = 3) -> dict:
    import jax
    import optax
    from flax import nnx

    from llm_rl.models import Qwen3Config, Qwen3ForCausalLM
    from llm_rl.rl import RLSettings, init_state, make_iteration
    from llm_rl.tokenization import char_tokenizer

    tok = char_tokenizer()
    cfg = Qwen3Config.tiny(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                           num_hidden_layers=layers, head_dim=32, bos_token_id=tok.bos_token_id,
                           eos_token_id=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    settings = RLSettings(**DEFAULT_RL, task="arithmetic",
                          task_kwargs=(("max_ops", 1), ("max_value", 20)))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-4))
    iterate = make_iteration(graphdef, params, optimizer, tok, settings)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None)
    passes = []
    for _ in range(2):  # the same iterations twice: cold (compiles), then warm
        state = init_state(params, optimizer, settings.staleness)
        n0 = len(compiles)
        start = time.perf_counter()
        state, metrics = iterate(state, iterations)
        seconds = time.perf_counter() - start
        b = settings.num_prompts * settings.group_size
        generated = float(metrics["response_length"].sum() * b)
        passes.append(dict(seconds=seconds, compiles=len(compiles) - n0,
                           compile_s=float(sum(compiles[n0:])), generated=generated))
    # Sequence width the update trains on: prompts as rl.make_iteration draws and pads them.
    from llm_rl import tasks
    from llm_rl.tokenization import encode_prompts

    trained, widths = 0, set()
    for step in range(iterations):
        rng = np.random.default_rng([settings.seed, step])
        problems = [tasks.TASKS[settings.task][0](rng, **dict(settings.task_kwargs))
                    for _ in range(settings.num_prompts)]
        width = encode_prompts(tok, [p.prompt for p in problems])[0].shape[1]
        trained += b * (width + settings.max_new_tokens)
        widths.add(width)
    for p in passes:
        p["trained"] = trained
    warm = passes[1]
    return dict(cfg=cfg, settings=settings, iterations=iterations, cold=passes[0], warm=warm,
                widths=sorted(widths),
                it_per_s=iterations / warm["seconds"],
                generated_per_s=warm["generated"] / warm["seconds"],
                mean_response=warm["generated"] / (iterations * b), batch=b)


# --- 5. checkpoint loading memory ---------------------------------------------------------


def _proc_status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def load_child(path: str, warm_path: str) -> None:
    """Child process: load ``warm_path`` (imports, first calls), then measure ``path``."""
    import tracemalloc

    import jax

    from llm_rl.models import from_pretrained

    jax.block_until_ready(nnx_state(from_pretrained(warm_path)[0]))
    gc.collect()
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    before = _proc_status()
    tracemalloc.start()
    model, _ = from_pretrained(path)
    jax.block_until_ready(nnx_state(model))
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    after = _proc_status()
    gc.collect()  # also runs jaxlib's deferred release of host buffers (a gc callback)
    collected = _proc_status()
    print(json.dumps(dict(before=before["VmRSS"], hwm_before=before["VmHWM"], after=after["VmRSS"],
                          hwm=after["VmHWM"], collected=collected["VmRSS"], traced_peak=traced_peak,
                          hwm_reset=reset)))


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def write_checkpoint(path: Path, *, vocab: int, hidden: int, tie: bool) -> tuple[int, int]:
    """A 1-layer Qwen3 whose embedding (and untied lm_head) dominate; returns (largest tensor
    bytes, total bytes)."""
    import jax.numpy as jnp
    from flax import nnx

    from llm_rl.models import Qwen3Config, Qwen3ForCausalLM, save_pretrained

    cfg = Qwen3Config.tiny(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                           num_hidden_layers=1, tie_word_embeddings=tie)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    leaves, sizes = [], []
    for p, var in nnx.to_flat_state(state):
        spec = var.get_value()
        value = rng.standard_normal(spec.shape, dtype=np.float32)
        sizes.append(value.nbytes)
        leaves.append((p, var.replace(jnp.asarray(value))))
    save_pretrained(nnx.merge(graphdef, nnx.from_flat_state(leaves)), cfg, path)
    return max(sizes), sum(sizes)


def bench_load_memory(root: Path, vocab: int, hidden: int) -> list[dict]:
    warm = root / "warm"
    write_checkpoint(warm, vocab=64, hidden=hidden, tie=False)
    rows = []
    for tie in (True, False):
        path = root / f"big-tie{int(tie)}"
        largest, total = write_checkpoint(path, vocab=vocab, hidden=hidden, tie=tie)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run([sys.executable, __file__, "--_load-child", str(path), str(warm)],
                              capture_output=True, text=True, env=env, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        base = m["before"] if m["hwm_reset"] else max(m["before"], m["hwm_before"])
        rows.append(dict(tie=tie, largest=largest, total=total,
                         resident=(m["after"] - m["before"]) / largest,
                         collected=(m["collected"] - m["before"]) / largest,
                         peak_over_start=(m["hwm"] - base) / largest,
                         traced_peak=m["traced_peak"] / largest, hwm_reset=m["hwm_reset"]))
    return rows


# --- report -------------------------------------------------------------------------------


def versions() -> str:
    import flax
    import jax
    import torch
    import transformers

    return (f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, batch 16 only, no hidden-512 sampling")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 3)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sampling,training,rl,memory")
    ap.add_argument("--results", default=None, help="append the section to this markdown file")
    ap.add_argument("--threads", type=int, default=CPUS,
                    help=f"pin the process to this many CPUs (XLA then runs that many threads) and "
                         f"give torch as many (default: all {CPUS} usable)")
    ap.add_argument("--_load-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load_child:
        load_child(*args._load_child)
        return
    if not 1 <= args.threads <= CPUS:
        ap.error(f"--threads must be in 1..{CPUS}")
    if args.threads < CPUS:  # before JAX starts: XLA sizes its pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-args.threads:])
    threads = len(os.sched_getaffinity(0))

    import jax
    import torch

    torch.set_num_threads(threads)  # XLA's CPU client runs one intra-op thread per usable CPU
    repeats = args.repeats or (3 if args.quick else 5)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    small = dict(hidden=256, inter=768, layers=4, heads=8, kv=4, head_dim=32, vocab=1024)
    mid = dict(hidden=512, inter=1536, layers=4, heads=8, kv=4, head_dim=64, vocab=1024)
    prompt_len, new = 32, 64
    batches = (16,) if args.quick else (16, 64)
    train_batch, train_seq, train_steps = (8, 128, 2)
    lines: list[str] = []
    say = lambda s="": (print(s, flush=True), lines.append(s))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = {}
        for name, spec in (("h256", small), ("h512", mid)):
            pairs[name] = build_pair(tmp / name, **spec)

        if "sampling" not in skip:
            say(f"### Sampling (float32, prompt {prompt_len}, {new} new tokens, no EOS; tokens/s = "
                f"batch x {new} / wall time; median of {repeats} interleaved repeats)")
            say()
            say("| model | batch | variant | tokens/s | ratio to hf greedy | first call s (compile) |")
            say("|---|---|---|---|---|---|")
            notes = []
            sampling_sets = [("h256", b) for b in batches] + ([] if args.quick else [("h512", 16), ("h512", 64)])
            for name, batch in sampling_sets:
                hf, ours, cfg = pairs[name]
                r = bench_sampling(hf, ours, cfg.vocab_size, batch, prompt_len, new, repeats)
                peer = r["rates"]["hf greedy"]
                for variant, rate in r["rates"].items():
                    c = r["compile_s"].get(variant)
                    say(f"| {name} | {batch} | {variant} | {rate:.0f} | {rate / peer:.2f} | "
                        f"{'' if c is None else f'{c:.1f}'} |")
                notes.append(f"{name} batch {batch}: greedy token agreement ours vs hf "
                             f"{r['greedy_agreement']:.3f}, hf generated {r['hf_new_tokens']} tokens/row, "
                             f"previous seq-major path tokens identical: {r['previous_equal']}")
            say()
            for n in notes:
                say(f"- {n}")
            say()
            hf, ours, cfg = pairs["h256"]
            d = bench_decode_step(ours, 64, prompt_len + new, repeats)
            say(f"Where a decoding step goes (h256, batch 64, {prompt_len + new} cache slots; one jitted "
                f"step per call, 20 calls per repeat, median of {repeats}):")
            say()
            say("| decoding step | ms per step | ratio to library |")
            say("|---|---|---|")
            base = d["library forward_cached (head-major [L,B,K,S,H])"]
            for k, v in d.items():
                say(f"| {k} | {v:.2f} | {v / base:.2f} |")
            say()

        if "training" not in skip:
            hf, ours, cfg = pairs["h512"]
            r = bench_training(hf, ours, cfg, train_batch, train_seq, train_steps, repeats)
            tokens = train_batch * train_seq
            flops = r["flops_per_token"]
            say(f"### Training step at hidden 512 ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
                f"heads, kv {cfg.num_key_value_heads}, head_dim {cfg.head_dim}, MLP {cfg.intermediate_size}, "
                f"vocab {cfg.vocab_size}, tied; batch {train_batch} x seq {train_seq} = {tokens} tokens; "
                f"{train_steps} steps per repeat, median of {repeats})")
            say()
            say("| side | tokens/s | ratio to torch | step ms | MFU vs jax matmul peak | MFU vs torch matmul peak |")
            say("|---|---|---|---|---|---|")
            for side in r["sides"]:
                rate = r["rates"][side]
                say(f"| {side} | {rate:.0f} | {rate / r['rates']['torch']:.2f} | {1e3 * tokens / rate:.0f} | "
                    f"{r['mfu'][side + ' vs jax']:.1%} | {r['mfu'][side + ' vs torch']:.1%} |")
            say()
            say(f"- MFU = (6 N + 12 L n_heads head_dim T) x tokens / step time / peak; N = {r['n_matmul']:,} "
                f"matmul parameters (kernels + the tied embedding once), L = {cfg.num_hidden_layers}, "
                f"T = {train_seq}: {flops / 1e6:.1f} MFLOP per token, {flops * tokens / 1e9:.1f} GFLOP per step.")
            say(f"- Measured float32 matmul peak (2048^3, timed in the same interleaved repeats; median): "
                f"jax {r['rates']['peak jax'] / 1e9:.1f} GFLOP/s, torch {r['rates']['peak torch'] / 1e9:.1f} "
                f"GFLOP/s. MFU is the median over repeats of (step FLOP/s / peak of the same repeat).")
            say(f"- Our steps compile in {r['compile_s']['ours']:.1f} s (plain) and "
                f"{r['compile_s']['ours chunked CE']:.1f} s (chunked CE, 256 tokens per chunk) (excluded). "
                f"Loss before training on the batch: ours {r['initial_loss']['ours']:.5f}, chunked "
                f"{r['initial_loss']['ours chunked CE']:.5f}, torch {r['initial_loss']['torch']:.5f}.")
            say()

        if "rl" not in skip:
            iters = 6 if args.quick else 10
            r = bench_rl(iters)
            c, s = r["cfg"], r["settings"]
            say("### One RL iteration (llm_rl.rl.make_iteration; absolute, no peer)")
            say()
            say(f"Qwen3 hidden {c.hidden_size}, {c.num_hidden_layers} layers, MLP {c.intermediate_size}, "
                f"heads {c.num_attention_heads}/{c.num_key_value_heads}, head_dim {c.head_dim}, char tokenizer "
                f"(vocab {c.vocab_size}), random weights; {s.num_prompts} prompts x {s.group_size} samples = "
                f"{r['batch']} rows, max {s.max_new_tokens} new tokens, temperature {s.temperature}, "
                f"arithmetic task, k3-loss KL, adam; {iters} iterations, run twice from the same state.")
            say()
            say("| pass | iterations/s | s per iteration | generated tokens/s | trained sequence tokens/s "
                "| compilations | compile s |")
            say("|---|---|---|---|---|---|---|")
            for label in ("cold", "warm"):
                p = r[label]
                say(f"| {label} | {iters / p['seconds']:.2f} | {p['seconds'] / iters:.3f} | "
                    f"{p['generated'] / p['seconds']:.0f} | {p['trained'] / p['seconds']:.0f} | "
                    f"{p['compiles']} | {p['compile_s']:.1f} |")
            say()
            say(f"- Mean response length {r['mean_response']:.1f} tokens. Generated tokens: sampled, up to "
                f"EOS; trained sequence tokens: rows x (padded prompt width + {s.max_new_tokens}), what the "
                f"update's 3 forward passes (reference, current, loss) and 1 backward run over. Prompt "
                f"widths seen: {r['widths']}; the cold pass compiles generate, update and a few eager ops "
                f"(prompts are padded to the batch's longest, so each new width compiles both again).")
            say()

        if "memory" not in skip:
            rows = bench_load_memory(tmp / "mem", vocab=65536, hidden=512)
            say("### Host memory of from_pretrained (child process, 1-layer Qwen3, vocab 65536 x hidden 512 "
                "float32 = 128 MiB per large tensor; in units of the largest tensor)")
            say()
            say("| large tensors (parameters) | numpy peak (tracemalloc) | RSS peak over start | "
                "RSS on return | RSS after gc.collect() |")
            say("|---|---|---|---|---|")
            for m in rows:
                what = ("embedding, tied (1 unit; Same rule)" if m["tie"] else
                        "embedding + lm_head, untied (2 units; Same + Linear rules)")
                say(f"| {what} | {m['traced_peak']:.2f} | {m['peak_over_start']:.2f} | "
                    f"{m['resident']:.2f} | {m['collected']:.2f} |")
            say()
            if not all(m["hwm_reset"] for m in rows):
                say("- VmHWM could not be reset; peaks are over max(start RSS, earlier peak).")
                say()

    say(f"Total benchmark time {time.perf_counter() - t_start:.0f} s; {versions()}; "
        f"{CPUS} CPUs on the machine, process pinned to {threads}: XLA CPU threads = {threads}, "
        f"torch.set_num_threads({threads}) "
        f"(torch interop {torch.get_num_interop_threads()}); device {jax.devices()[0].platform}.")
    if args.results:
        cmd = " ".join(["PYTHONPATH=. .venv/bin/python benchmarks/lm_zoo.py"] + sys.argv[1:])
        head = ["## LM zoo vs transformers on PyTorch (sampling, training, MFU, RL iteration, loading memory)",
                "", f"`{cmd}`, {datetime.date.today().isoformat()}, 2-core CPU machine.", ""]
        with open(args.results, "a") as f:
            f.write("\n" + "\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
