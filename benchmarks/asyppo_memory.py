"""Step time and peak memory of one RL update: AsyPPO (2 mini-critics) against PPO with a
critic of the actor's size, same process, same batch.

Configurations (all take one update on the same rollout batch: reference and current
log-probs, old values, GAE, then ``epochs x minibatches`` guarded policy and critic steps):

- ``ppo (llm_rl.ppo)``: the plain PPO trainer, one ValueModel of the actor's config;
- ``ppo, actor-size critic (asyppo trainer, M=1)``: the same model set through
  :mod:`llm_rl.asyppo` with one critic, k = h = 0 (the baseline of the experiment);
- ``asyppo, M mini-critics``: M ValueModels of a smaller config (``--critic-width``,
  ``--critic-layers``), stacked and vmapped, k = h = 20%.

Memory is XLA's accounting of the compiled update (``jit(...).lower(...).compile()
.memory_analysis()``): ``peak`` = arguments + outputs + temporaries - aliased (the train state
is an argument and an output: parameters, optimizer states, guards), and the train state's
own bytes (what stays resident between updates). On an accelerator the script also reads
the device's ``peak_bytes_in_use`` (not available on CPU). Step time: median over
interleaved repeats of the jitted update, as a ratio to the first configuration.

    python benchmarks/asyppo_memory.py [--width 256] [--layers 4] [--critic-width 96]
        [--critic-layers 2] [--prompts 8] [--group 4] [--prompt-len 16] [--new-tokens 48]
        [--epochs 1] [--minibatches 1] [--critics 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MIB = 2.0 ** 20


def _cfg(vocab, width, layers, heads, kv, inter):
    from llm_rl.models import Qwen3Config

    return Qwen3Config.tiny(vocab_size=vocab, hidden_size=width, intermediate_size=inter,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv, head_dim=width // heads)


def _batch(args, vocab, seed=0):
    rng = np.random.default_rng(seed)
    B, P, N = args.prompts * args.group, args.prompt_len, args.new_tokens
    seq = rng.integers(4, vocab, (B, P + N)).astype(np.int32)
    lengths = rng.integers(N // 2, N + 1, B)
    resp_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    seq_mask = np.concatenate([np.ones((B, P), np.int32), resp_mask], 1)
    behavior = (-rng.random((B, N)).astype(np.float32) * 3) * resp_mask
    rewards = rng.integers(0, 2, B).astype(np.float32)
    return [jnp.asarray(x) for x in (seq, seq_mask, behavior, resp_mask, rewards)]


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--critic-width", type=int, default=96)
    p.add_argument("--critic-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--critics", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from llm_rl import asyppo, ppo
    from llm_rl.models import Qwen3ForCausalLM, ValueModel
    from llm_rl.tokenization import char_tokenizer

    tokenizer = char_tokenizer()  # only its special ids are used (no rollouts are sampled)
    actor_cfg = _cfg(args.vocab, args.width, args.layers, 4, 2, 3 * args.width)
    mini_cfg = _cfg(args.vocab, args.critic_width, args.critic_layers, 2, 1, 3 * args.critic_width)
    graphdef, params = nnx.split(Qwen3ForCausalLM(actor_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ref = jax.tree.map(jnp.array, params)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-5))
    copt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-5))
    batch = _batch(args, args.vocab)
    common = dict(num_prompts=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                  placement="none", aggregation="seq_mean_token_mean")
    key = jax.random.key(0)

    configs = {}
    big_graphdef, big = nnx.split(ValueModel(actor_cfg, rngs=nnx.Rngs(1)), nnx.Param)
    it = ppo.make_iteration(graphdef, ref, big_graphdef, opt, copt, tokenizer,
                            ppo.PPOSettings(**common))
    configs["ppo, actor-size critic (llm_rl.ppo)"] = (
        it.update, ppo.init_state(params, big, opt, copt, 0), ())
    sched = dict(epochs=args.epochs, num_minibatches=args.minibatches, entropy_coef=0.001)
    it = asyppo.make_iteration(graphdef, ref, big_graphdef, opt, copt, tokenizer,
                               asyppo.AsyPPOSettings(**common, **sched, num_critics=1,
                                                     adv_mask_frac=0, ent_filter_frac=0))
    configs["ppo, actor-size critic (asyppo trainer, M=1)"] = (
        it.update, asyppo.init_state(params, asyppo.stack_params([big]), opt, copt), (key,))
    for m in args.critics:
        cg, stacked = asyppo.init_ensemble(mini_cfg, m, seed=10)
        it = asyppo.make_iteration(graphdef, ref, cg, opt, copt, tokenizer,
                                   asyppo.AsyPPOSettings(**common, **sched, num_critics=m))
        configs[f"asyppo, {m} mini-critics"] = (
            it.update, asyppo.init_state(params, stacked, opt, copt), (key,))

    rows, times = {}, {name: [] for name in configs}
    for name, (update, state, extra) in configs.items():
        start = time.perf_counter()
        compiled = update.lower(state, *batch, *extra).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        critic = (state.critic_params, state.critic_opt_state)
        rows[name] = dict(actor_params=sum(x.size for x in jax.tree.leaves(state.params)),
                          critic_params=sum(x.size for x in jax.tree.leaves(state.critic_params)),
                          state_mib=_tree_bytes(state) / MIB, critic_state_mib=_tree_bytes(critic) / MIB,
                          temp_mib=mem.temp_size_in_bytes / MIB, peak_mib=peak / MIB,
                          compile_s=compile_s)
        jax.block_until_ready(update(state, *batch, *extra))  # warm
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits all alike
        for name, (update, state, extra) in configs.items():
            start = time.perf_counter()
            jax.block_until_ready(update(state, *batch, *extra))
            times[name].append(time.perf_counter() - start)
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    first = next(iter(configs))
    t0 = statistics.median(times[first])
    m0 = rows[first]["peak_mib"]
    print(f"device: {device.device_kind}, jax {jax.__version__}; actor {rows[first]['actor_params']:,} "
          f"params; batch {args.prompts}x{args.group} responses, {args.prompt_len}+{args.new_tokens} "
          f"tokens; {args.epochs} epoch(s) x {args.minibatches} minibatch(es)")
    print("| configuration | critic params | critic state MiB | train state MiB | XLA temp MiB "
          "| XLA peak MiB | peak vs first | step ms (median) | time vs first | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = statistics.median(times[name])
        print(f"| {name} | {r['critic_params']:,} | {r['critic_state_mib']:.1f} | {r['state_mib']:.1f} | "
              f"{r['temp_mib']:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] / m0:.2f}x | {1e3 * t:.1f} | "
              f"{t / t0:.2f}x | {r['compile_s']:.1f} |")
    if stats:
        print(f"device peak_bytes_in_use (whole process): {stats.get('peak_bytes_in_use', 0) / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
