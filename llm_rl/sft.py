"""Supervised fine-tuning (SFT) on (prompt, completion) documents, with sequence packing.

Pure functions (no training state):

- :func:`render_prompt`: the prompt text of one example. With an HF tokenizer that has a
  ``chat_template`` the prompt is the user turn rendered by that template (with the generation
  prompt); otherwise the **plain template** is used: the prompt as is, so a document reads
  ``<bos> prompt completion <eos>`` (the project's tasks already end their prompts in ``"A: "``).
- :func:`encode_document`: token ids of one document and its loss mask (1 on the completion
  tokens and the EOS, 0 on ``<bos>`` and the prompt: prompt-loss masking).
- :func:`pack_documents`: documents laid end to end in rows of ``seq_len`` tokens (first-fit
  in order), with ``segment_ids`` (1, 2, ... per document in a row, 0 on padding) and
  ``positions`` restarting at 0 for every document. The models take ``segment_ids``
  (:func:`llm_rl.models.layers.causal_padding_mask`), so no document attends to another and a
  packed row computes exactly what its documents would compute one by one.
- :func:`packed_nll`: the summed next-token negative log-likelihood and the token count,

      NLL = - sum_{b,t} m_{b,t+1} [seg_{b,t+1} = seg_{b,t}] log p(x_{b,t+1} | x_{b,<=t}),

  with ``m`` the loss mask; the segment condition makes certain that no document is
  predicted from the last token of the one before it. The training loss is ``NLL / count``
  (the mean over completion tokens of the batch), as in TRL's SFTTrainer with packing.
- :func:`budget_documents`: documents (cycled in a fresh shuffled order each epoch) until
  their completion tokens reach a **token budget**; training on the same budget makes trace
  sets of different lengths comparable ("Shape of Thought", arXiv 2512.22255, compares trace
  sets at equal training tokens).

The loop, :func:`train_sft`, runs jitted AdamW steps (:func:`make_step`) over the packed rows
under :func:`trainkit.loop.fit`: batches are split over the ``data`` axis of a
:mod:`trainkit.sharding` mesh (parameters replicated; with several processes the mesh spans
all their devices and each process uploads only its rows), non-finite steps are skipped by
:func:`trainkit.guards.guarded_update`, checkpoints hold params, optimizer state, guard and
step, and the rows of step ``s`` are a fixed function of the seed and ``s``, so an interrupted
run resumed from its checkpoint ends with bitwise the same parameters as one never stopped.
The progress bar shows the loss and completion tokens per second.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trainkit.config import Config, field
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir
from trainkit.sharding import (
    batch_sharding,
    make_global_batch,
    make_mesh,
    process_batch_slice,
    replicated,
    to_host,
)

PLAIN_TEMPLATE = "{prompt}"  # no chat template: the prompt text itself (see the module doc)


# --- documents and packing (pure) ---------------------------------------------------------


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: the tokenizer's own chat template (one user turn,
    generation prompt added) when it has one, else :data:`PLAIN_TEMPLATE`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


class Document(NamedTuple):
    ids: np.ndarray  # [L] int32: <bos>? prompt completion <eos>?
    loss_mask: np.ndarray  # [L] int32: 1 on completion tokens (and the EOS)


def encode_document(tokenizer, prompt: str, completion: str, *, add_eos: bool = True) -> Document:
    """Token ids and loss mask of one (prompt, completion) example (prompt via
    :func:`render_prompt`). A chat-templated prompt carries its own begin token, so ``<bos>``
    is only added for the plain template."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not templated else []
    p_ids = head + list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        c_ids.append(tokenizer.eos_token_id)
    ids = np.asarray(p_ids + c_ids, np.int32)
    mask = np.asarray([0] * len(p_ids) + [1] * len(c_ids), np.int32)
    return Document(ids, mask)


class Packed(NamedTuple):
    input_ids: np.ndarray  # [R, T] int32
    segment_ids: np.ndarray  # [R, T] int32, 1.. per document in its row, 0 = padding
    positions: np.ndarray  # [R, T] int32, restarting at 0 per document
    loss_mask: np.ndarray  # [R, T] int32
    truncated: int  # documents cut to seq_len


def pack_documents(docs: Sequence[Document], seq_len: int, *, pad_id: int = 0) -> Packed:
    """Pack ``docs`` in order into rows of ``seq_len`` tokens: a document goes into the current
    row if it fits, else starts a new row (a document longer than ``seq_len`` is cut and
    counted in ``truncated``). Every document keeps its own positions 0, 1, ... and a
    segment id unique within its row."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    rows: list[list[Document]] = []
    used = seq_len  # forces a first row
    truncated = 0
    for doc in docs:
        if len(doc.ids) > seq_len:
            doc = Document(doc.ids[:seq_len], doc.loss_mask[:seq_len])
            truncated += 1
        if used + len(doc.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += len(doc.ids)
    n = len(rows)
    ids = np.full((n, seq_len), pad_id, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    pos = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for k, doc in enumerate(row, 1):
            end = at + len(doc.ids)
            ids[r, at:end], mask[r, at:end] = doc.ids, doc.loss_mask
            seg[r, at:end], pos[r, at:end] = k, np.arange(len(doc.ids))
            at = end
    return Packed(ids, seg, pos, mask, truncated)


def _next_token_weights(input_ids, loss_mask, segment_ids) -> jax.Array:
    """float32 [B, T-1]: 1 where target ``t+1`` is loss-masked and in the same document as ``t``."""
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return ((loss_mask[:, 1:] != 0) & same_doc).astype(jnp.float32)


def packed_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
               segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(NLL, count)``: the summed negative log-likelihood of the loss-masked next tokens
    (targets ``t+1`` predicted at ``t`` within one document, see the module docstring) and the
    number of such tokens. logits [B, T, V]; the others [B, T]."""
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape([input_ids, loss_mask, segment_ids])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    m = _next_token_weights(input_ids, loss_mask, segment_ids)
    return -jnp.sum(picked * m), jnp.sum(m)


def output_projection(model) -> Callable[[jax.Array], jax.Array]:
    """``h [B, T, D] -> float32 logits [B, T, V]``: a CausalLM's ``lm_head``, or the tied
    embedding when it has none (exactly what ``model(...)`` applies after the trunk)."""
    if model.lm_head is None:
        return model.model.embed_tokens.attend
    return lambda h: model.lm_head(h, out_dtype=jnp.float32)


def chunked_token_nll(hidden: jax.Array, project: Callable[[jax.Array], jax.Array],
                      targets: jax.Array, weights: jax.Array, chunk: int) -> jax.Array:
    """Weighted summed cross-entropy over the vocabulary, computed ``chunk`` tokens at a time,

        NLL = sum_i w_i (logsumexp_v z_{i,v} - z_{i,y_i}),   z_i = project(h_i),

    equal (to float rounding) to ``-sum(w * log_softmax(project(h))[y])`` but without ever
    holding the [tokens, V] logits: the B*T tokens (zero-padded to a multiple of ``chunk``)
    run through a ``lax.scan`` whose body is ``jax.checkpoint``-ed, so the forward keeps one
    scalar per chunk and the backward recomputes one chunk's [chunk, V] logits at a time
    (the "fused"/"cut" cross-entropy of Liger-Kernel and Wijmans et al. 2024, arXiv
    2411.09009, done here with remat instead of a custom kernel).

    hidden [B, T, D]; targets, weights [B, T] (weights 0 on positions that do not count)."""
    chex.assert_rank(hidden, 3)
    chex.assert_equal_shape([targets, weights])
    chex.assert_equal_shape_prefix([hidden, targets], 2)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    d = hidden.shape[-1]
    n = targets.size
    pad = (-n) % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(-1, chunk)
    w = jnp.pad(weights.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def one_chunk(hc, yc, wc):
        z = project(hc[None])[0].astype(jnp.float32)  # [chunk, V]
        picked = jnp.take_along_axis(z, yc[:, None], axis=-1)[:, 0]
        return jnp.sum(wc * (jax.nn.logsumexp(z, axis=-1) - picked))

    total, _ = jax.lax.scan(lambda acc, xs: (acc + one_chunk(*xs), None),
                            jnp.zeros((), jnp.float32), (h, y, w))
    return total


def packed_nll_chunked(model, input_ids: jax.Array, positions: jax.Array, loss_mask: jax.Array,
                       segment_ids: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """:func:`packed_nll` of ``model`` on a packed batch via :func:`chunked_token_nll`: the
    trunk's hidden states, then the output projection chunk by chunk."""
    chex.assert_equal_shape([input_ids, loss_mask, segment_ids])
    h = model.model(input_ids, positions=positions, segment_ids=segment_ids)
    m = _next_token_weights(input_ids, loss_mask, segment_ids)
    return chunked_token_nll(h[:, :-1], output_projection(model), input_ids[:, 1:], m, chunk), jnp.sum(m)


def sft_loss(logits, input_ids, loss_mask, segment_ids) -> jax.Array:
    """Mean NLL per completion token of the batch (:func:`packed_nll`)."""
    nll, count = packed_nll(logits, input_ids, loss_mask, segment_ids)
    return nll / jnp.maximum(count, 1.0)


def budget_documents(docs: Sequence[Document], token_budget: int, seed: int) -> list[Document]:
    """Documents in a seeded shuffled order (reshuffled each pass over ``docs``) until their
    completion tokens (``sum(loss_mask)``) reach ``token_budget``: the result trains on
    ``budget <= tokens < budget + longest document``."""
    if not docs:
        raise ValueError("no documents to train on")
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} must be >= 1")
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < token_budget:
        for i in rng.permutation(len(docs)):
            out.append(docs[i])
            total += int(docs[i].loss_mask.sum())
            if total >= token_budget:
                break
    return out


def completion_tokens(packed: Packed) -> int:
    """Tokens that carry loss in ``packed`` (what :func:`packed_nll` counts)."""
    m = packed.loss_mask[:, 1:] * (packed.segment_ids[:, 1:] == packed.segment_ids[:, :-1])
    return int(m.sum())


# --- training -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTConfig(Config):
    seq_len: int = field(128, ge=8, help="tokens per packed row")
    batch_size: int = field(8, ge=1, help="packed rows per step (split over the data axis)")
    token_budget: int = field(20_000, ge=1, help="completion tokens trained (equal across trace sets)")
    lr: float = field(1e-3, gt=0, le=1)
    warmup_steps: int = field(10, ge=0)
    weight_decay: float = field(0.0, ge=0)
    clip_norm: float = field(1.0, gt=0)
    chunk_size: int = field(50, ge=1, help="steps between host work (logs, progress, checkpoints)")
    save_every: int = field(1000, ge=1)
    max_nonfinite: int = field(10, ge=1, help="consecutive skipped steps before the run stops")


class SFTState(NamedTuple):
    params: Any
    opt_state: Any
    guard: GuardState
    step: jax.Array  # updates done
    total: jax.Array  # updates planned (the learning-rate schedule's length)
    hparams: dict  # lr, warmup_steps, weight_decay, clip_norm as arrays: one compiled step
    # serves every stage and run of one model shape


def learning_rate(hp: dict, step: jax.Array, total: jax.Array) -> jax.Array:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr / 10``
    at ``total`` (optax's ``warmup_cosine_decay_schedule`` with end value ``lr / 10``)."""
    step = step.astype(jnp.float32)
    warm = jnp.maximum(hp["warmup_steps"], 1.0)
    frac = jnp.clip((step - warm) / jnp.maximum(total.astype(jnp.float32) - warm, 1.0), 0.0, 1.0)
    cosine = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return hp["lr"] * jnp.where(step < warm, step / warm, cosine)


def make_optimizer(hp: dict, lr: jax.Array | float) -> optax.GradientTransformation:
    """AdamW: clip by global norm, Adam moments, decoupled weight decay, ``-lr``."""
    return optax.chain(optax.clip_by_global_norm(hp["clip_norm"]), optax.scale_by_adam(),
                       optax.add_decayed_weights(hp["weight_decay"]), optax.scale(-lr))


def init_state(cfg: SFTConfig, params: Any, total_steps: int) -> SFTState:
    hp = {k: jnp.asarray(float(getattr(cfg, k)), jnp.float32)
          for k in ("lr", "warmup_steps", "weight_decay", "clip_norm")}
    return SFTState(params, make_optimizer(hp, 1.0).init(params), init_guard(),
                    jnp.zeros((), jnp.int32), jnp.asarray(total_steps, jnp.int32), hp)


def make_step(graphdef, ce_chunk: int = 0):
    """``step(state, batch) -> (state, metrics)``: one guarded AdamW update on a packed batch
    (a dict of [B, T] arrays from :class:`Packed`). Pure; jit it. ``ce_chunk > 0`` computes
    the loss with :func:`packed_nll_chunked` (same value and gradient, no [tokens, V] logits)."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        if ce_chunk:
            nll, count = packed_nll_chunked(model, batch["input_ids"], batch["positions"],
                                            batch["loss_mask"], batch["segment_ids"], ce_chunk)
            return nll / jnp.maximum(count, 1.0), count
        logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        nll, count = packed_nll(logits, batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
        return nll / jnp.maximum(count, 1.0), count

    def step(state: SFTState, batch):
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        lr = learning_rate(state.hparams, state.step, state.total)
        params, opt_state, guard, gm = guarded_update(make_optimizer(state.hparams, lr), grads,
                                                      state.opt_state, state.params, loss, state.guard)
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),
                   "lr": lr, **gm}
        return state._replace(params=params, opt_state=opt_state, guard=guard,
                              step=state.step + 1), metrics

    return step


def batches(packed: Packed, batch_size: int) -> dict[str, np.ndarray]:
    """The packed rows as [steps, batch_size, T] arrays (the last step padded with empty rows,
    which carry no loss)."""
    rows = packed.input_ids.shape[0]
    steps = -(-rows // batch_size)
    pad = steps * batch_size - rows

    def shape(x):
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        return x.reshape(steps, batch_size, *x.shape[1:])

    return {"input_ids": shape(packed.input_ids), "segment_ids": shape(packed.segment_ids),
            "positions": shape(packed.positions), "loss_mask": shape(packed.loss_mask)}


_STEP_CACHE: dict[Any, Any] = {}


def _compiled_step(graphdef, mesh):
    """One jitted step per (model structure, mesh), reused across runs (an experiment trains
    many students of the same shape)."""
    key = (graphdef, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) > 8:
            _STEP_CACHE.clear()
        _STEP_CACHE[key] = jax.jit(make_step(graphdef), donate_argnums=0)
    return _STEP_CACHE[key]


def default_mesh(batch_size: int):
    """Every device on the ``data`` axis when their number divides ``batch_size``, else one.
    With several processes every device must take part, so ``batch_size`` must be a multiple
    of the device count (``ValueError`` otherwise)."""
    if batch_size % jax.device_count() == 0:
        return make_mesh(data=jax.device_count())
    if jax.process_count() > 1:
        raise ValueError(f"SFT batch size {batch_size} is not a multiple of the "
                         f"{jax.device_count()} devices of the {jax.process_count()} processes")
    return make_mesh(data=1, devices=jax.devices()[:1])


def train_sft(model, tokenizer, examples: Sequence[tuple[str, str]], cfg: SFTConfig, run_dir: RunDir,
              *, seed: int = 0, resume: bool = False, desc: str = "sft", max_steps: int | None = None,
              mesh=None) -> tuple[Any, dict]:
    """Fine-tune ``model`` (NNX; its parameters are updated in place) on ``examples`` =
    [(prompt, completion)] for ``cfg.token_budget`` completion tokens. Logs, checkpoints and
    resumes in ``run_dir``. ``max_steps`` stops early (checkpointed) as a preemption would;
    ``resume=True`` continues from the latest checkpoint. ``mesh``: a :mod:`trainkit.sharding`
    mesh whose ``data`` x ``fsdp`` axes split each batch (default :func:`default_mesh`).
    Returns ``(model, info)``: steps, documents, completion tokens, truncated documents,
    completion tokens per second, skipped (non-finite) steps."""
    docs = [encode_document(tokenizer, p, c) for p, c in examples]
    chosen = budget_documents(docs, cfg.token_budget, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = pack_documents(chosen, cfg.seq_len, pad_id=pad)
    data = batches(packed, cfg.batch_size)
    num_steps = data["input_ids"].shape[0]
    mesh = mesh if mesh is not None else default_mesh(cfg.batch_size)
    graphdef, params = nnx.split(model, nnx.Param)
    state = jax.device_put(init_state(cfg, params, num_steps), replicated(mesh))
    step_fn = _compiled_step(graphdef, mesh)
    sharding = batch_sharding(mesh)
    mine = process_batch_slice(sharding, data["input_ids"].shape[1:])
    seconds = [0.0]

    def chunk(state: SFTState, n: int):
        start = int(state.step)
        t0 = time.perf_counter()
        rows = []
        for s in range(start, start + n):
            # each process uploads only the rows its devices hold (all of them with one process)
            batch = make_global_batch({k: v[s, mine] for k, v in data.items()}, sharding,
                                      {k: v.shape[1:] for k, v in data.items()})
            state, metrics = step_fn(state, batch)
            rows.append(metrics)
        rows = jax.device_get(rows)
        dt = max(time.perf_counter() - t0, 1e-9)
        seconds[0] += dt
        out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
        out["tokens_per_s"] = np.full(n, out["tokens"].sum() / dt, np.float64)
        return state, out

    settings = LoopSettings(num_steps=num_steps if max_steps is None else min(max_steps, num_steps),
                            chunk_size=cfg.chunk_size, save_every=cfg.save_every,
                            key_metric=("loss", "tokens_per_s"), desc=desc,
                            max_nonfinite=cfg.max_nonfinite)
    state, logger = fit(run_dir, state, chunk, settings, resume=resume)
    logger.close()
    nnx.update(model, jax.tree.map(to_host, state.params))  # a local copy on every process
    tokens = completion_tokens(packed)
    info = {"steps": num_steps, "steps_done": int(state.step), "documents": len(chosen),
            "completion_tokens": tokens, "truncated": packed.truncated,
            "rows": int(packed.input_ids.shape[0]),
            "tokens_per_s": tokens / seconds[0] if seconds[0] and max_steps is None else None,
            "nonfinite_total": int(state.guard.total)}
    return model, info


def completion_nll(model, tokenizer, examples: Sequence[tuple[str, str]], *, seq_len: int = 256,
                   batch_size: int = 32) -> tuple[float, int]:
    """Mean NLL per completion token of ``examples`` under ``model`` (packed, no cross-document
    attention) and the token count: ``exp`` of it is the perplexity of the traces."""
    docs = [encode_document(tokenizer, p, c) for p, c in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = pack_documents(docs, seq_len, pad_id=pad)
    data = batches(packed, batch_size)
    graphdef, params = nnx.split(model)
    total, count = 0.0, 0.0
    for s in range(data["input_ids"].shape[0]):
        nll, c = _batch_nll(graphdef, params, {k: v[s] for k, v in data.items()})
        total, count = total + float(nll), count + float(c)
    return total / max(count, 1.0), int(count)


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(graphdef, params, batch):
    logits = nnx.merge(graphdef, params)(batch["input_ids"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"])
    return packed_nll(logits, batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
