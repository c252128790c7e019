"""Where one training gradient of the LM zoo spends its time on CPU: a per-op profile of the
jitted ``grad`` of the next-token loss (the h512 model of ``benchmarks/lm_zoo.py``), summed by
XLA op kind, with the slowest matmuls and the slowest other ops listed by shape.

XLA's CPU thunks are traced with ``--xla_cpu_enable_xprof_traceme`` and read back with
``jax.profiler.ProfileData``; each op's time is the mean over ``--calls`` calls. ``ynn_fusion``
ops are XLA's YNNPACK kernels (matmuls, and some reductions), ``dot`` ops its Eigen fallback.

    PYTHONPATH=. .venv/bin/python benchmarks/lm_train_profile.py [--autodiff-dw] [--threads 1]

``--autodiff-dw`` traces the dense layers with JAX's own ``tensordot`` gradient instead of
``trainkit.nn.layers.contract``'s CPU rule (the library before 2026-12-07).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--autodiff-dw", action="store_true", help="JAX's own tensordot gradient")
    ap.add_argument("--threads", type=int, default=1, help="CPUs the process is pinned to")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls (after one warm-up)")
    ap.add_argument("--top", type=int, default=12, help="rows in each list")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cpus):
        ap.error(f"--threads must be in 1..{len(cpus)}")
    os.sched_setaffinity(0, cpus[-args.threads:])  # before JAX starts: XLA sizes its pool from it
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lm_zoo import autodiff_contract, build_pair

    with tempfile.TemporaryDirectory() as tmp:
        _, ours, _ = build_pair(Path(tmp) / "m", hidden=512, inter=1536, layers=4, heads=8, kv=4,
                                head_dim=64, vocab=1024)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (8, 128)).astype(np.int32))
        graphdef, params = nnx.split(ours, nnx.Param)

        def loss_fn(p, x):
            logits = nnx.merge(graphdef, p)(x)[:, :-1]
            return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), x[:, 1:, None], -1).mean()

        grad = jax.jit(jax.grad(loss_fn))
        with autodiff_contract() if args.autodiff_dw else contextlib.nullcontext():
            compiled = grad.lower(params, ids).compile()
        jax.block_until_ready(compiled(params, ids))
        trace_dir = Path(tmp) / "trace"
        with jax.profiler.trace(str(trace_dir)):
            for _ in range(args.calls):
                jax.block_until_ready(compiled(params, ids))
        xplane = glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True)[-1]
        profile = jax.profiler.ProfileData.from_file(xplane)

    ops = {}  # HLO instruction name -> the instruction's text
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            ops[m.group(1)] = re.sub(r", metadata=.*", "", line.strip())
    ms = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):  # XLA's intra-op thread pool
                for ev in line.events:
                    if ev.name in ops:
                        ms[ev.name] += ev.duration_ns / 1e6 / args.calls
    kinds = collections.Counter()
    for name, t in ms.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += t
    print(f"gradient of the h512 next-token loss, batch 8 x 128, {args.threads} thread(s), "
          f"{'autodiff dW' if args.autodiff_dw else 'library contract'}: {sum(ms.values()):.0f} ms "
          f"in XLA ops per call (mean of {args.calls})")
    print("\n| op kind | ms per call | share |\n|---|---|---|")
    for kind, t in kinds.most_common(args.top):
        print(f"| {kind} | {t:.1f} | {t / sum(ms.values()):.1%} |")
    for title, pick in (("matmuls (ynn_fusion: YNNPACK, dot: Eigen)", lambda n: n.startswith(("ynn", "dot"))),
                        ("other ops", lambda n: not n.startswith(("ynn", "dot")))):
        print(f"\nslowest {title}:")
        for name, t in [(n, t) for n, t in ms.most_common() if pick(n)][:args.top]:
            print(f"  {t:6.2f} ms  {ops[name][:160]}")


if __name__ == "__main__":
    main()
