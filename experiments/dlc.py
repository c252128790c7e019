"""dlc: Discrete Latent Codes end to end on rendered shapes -- SEM codes from a self-distilled
ViT condition a pixel DiT; an MDLM prior generates codes; composition and text-to-code.

Reproduces the pipeline of "Compositional Discrete Latent Code for High Fidelity, Productive
Diffusion Models" (Lavoie, Noukhovitch, Courville 2025, arXiv 2507.12318) at laptop scale, on
the 32x32 shapes of :mod:`generative.datasets` (a shape of some kind and colour, with a size,
on a textured, coloured background; captions like "a small red triangle on blue stripes"):

1. **Data** (stage ``data``). Training images are examples ``0..num_train-1`` of the shapes
   ``train`` split *minus* every image whose (kind, colour) pair is one of
   ``data.heldout_pairs``: no model of the pipeline ever sees those combinations. The
   evaluation pool is examples ``0..num_test-1`` of the ``test`` split: its seen-combination
   images make the reference set ``R`` and a disjoint second real set ``B`` (the real-vs-real
   baseline); its held-out-combination images give the text prompts. Images are rendered by
   :func:`generative.datasets.shape_example` (the images ``datasets.build`` stores).
2. **SEM encoder** (stage ``sem``): :func:`generative.vit_dino.train_sem_encoder` (ViT + SEM
   + DINO head, DINOv2's Sinkhorn-Knopp teacher, KoLeo, 1/fan-in init), then
   :func:`~generative.vit_dino.extract_codes` of the teacher: ``L`` tokens over ``V`` per image
   and the SEM distributions. The kNN accuracy (k=20, DINO protocol) of the SEM and of the
   one-hot codes on the shape's kind and colour, trained against the untrained encoder, is
   recorded: at this scale DINO barely beats a random ViT (see the table above the strict
   xfail in tests/generative/test_vit_dino.py), and the report says so with the numbers.
   ``sem.encoder=attributes`` (preset ``control``) swaps in a *supervised control*
   (:mod:`generative.sem_supervised`): the same ViT + SEM trained to predict the renderer's
   attributes from the code, so that the codes carry the image's content; not the paper's
   method, but it tests what the paper's claim rests on (conditioning on an informative code).
3. **DiT at equal compute** (stage ``dit``): (a) unconditional and (b) DLC-conditioned
   :class:`generative.dit.DiT` trained side by side by one ``vmap``-ped step: the same
   architecture, initial parameters, steps, batches, times and noise; the only difference is
   the code-dropout probability, 1 for (a) (the null code always) and ``cfg_dropout`` for (b)
   (classifier-free guidance). Rectified flow, EMA weights for sampling.
4. **Code generators** (stage ``codes``): two MDLM (:mod:`generative.discrete_diffusion`)
   :class:`generative.code_denoiser.CodeDenoiser` of one architecture, trained side by side on
   ``[prefix, code]`` sequences whose prefix is never masked: text-to-code, whose prefix is the
   caption's word ids (:func:`generative.dlc.encode_captions`, ids ``V+1..`` via
   ``extra_tokens``), trained on (caption, code) pairs; and the unconditional code prior, whose
   prefix is all ``<pad>`` (a constant: it carries no information, so the model is an
   unconditional MDLM over the ``L`` tokens).
5. **Samples** (stage ``samples``): (a) unconditional DiT; (b) DLC DiT on codes from the MDLM
   prior (the paper's unconditional pipeline); (c) DLC DiT on the codes of the real images of
   ``B`` (reconstruction, an upper bound for (b)); (d) composition: the SEM distributions of two
   real images that differ in kind and colour averaged (:func:`generative.dlc.compose`), a code
   sampled (:func:`generative.dlc.sample_code` at ``compose_temperature``) and decoded; (e)
   text-to-image: the captions of held-out-combination test images -> text-to-code -> DiT.
6. **Evaluation** (stages ``classifier``, ``eval``): an attribute CNN
   (:func:`generative.evaluation.train_attribute_classifier`) trained once on separate renders
   of the full distribution; "FD (attribute-CNN features)" (the Frechet distance of FID in this
   classifier's 128-d feature space -- not an FID), precision and recall (k=3) of (a), (b), (c)
   and of ``B`` against ``R``; attribute accuracy of (c) against the source images, of (e)
   against the requested attributes and of (d) against each parent, each next to its chance
   level (the training marginal: the probability that a training image has the requested
   value).

Every stage saves its outputs under ``<run>/checkpoints/<stage>/`` (codes ``.npy``, params,
histories) and writes ``done.json`` last; ``--resume`` loads finished stages instead of
recomputing them (stage-level resume). Seeds are derived from ``seed`` per stage, so a run is
deterministic.

Run: ``python -m experiments run dlc --preset cpu`` (``--preset control`` for the supervised
control encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.registry import Experiment, RunContext, RunResult, UserError
from generative import code_denoiser as cd
from generative import datasets
from generative import discrete_diffusion as dd
from generative import dit
from generative import dlc
from generative import evaluation as ev
from generative import sem_supervised as ss
from generative import vit_dino as vd
from generative.sem import SEMConfig
from trainkit import guards, plots
from trainkit.config import Config, ConfigError, field, load_json
from trainkit.config import keys as config_keys
from trainkit.run import Progress, RunDir, is_main_process, read_json, write_json
from trainkit.sharding import local_replica, make_mesh, replicate, spread_batch, to_host

STAGES = ("data", "classifier", "sem", "dit", "codes", "samples", "eval")
SAMPLE_SETS = ("uncond", "prior", "recon", "compose", "text")
SET_TITLES = {"real": "real vs real (B vs R)", "uncond": "(a) unconditional DiT",
              "prior": "(b) DLC DiT, codes from the MDLM prior",
              "recon": "(c) DLC DiT, codes of real held-out images",
              "compose": "(d) composition of two images' codes",
              "text": "(e) text-to-image, held-out combinations"}
HEADS = tuple(ev.SHAPE_ATTRIBUTES)  # kind, colour, size, background, background_colour
SEM_ENCODERS = ("dino", "attributes")
ENCODER_TITLES = {"dino": "self-supervised (DINO + SEM), the paper's kind of encoder",
                  "attributes": "supervised control (ViT + SEM trained to predict the "
                                "renderer's attributes from the code), not the paper's method"}
FD_NAME = "FD (attribute-CNN features)"
# the pre-registered comparisons: set A - set B in FD against R (negative: A is closer)
FD_COMPARISONS = (("prior", "uncond"), ("recon", "uncond"), ("recon", "prior"))


# --- config -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    seed: int = field(0, ge=0, help="shapes data seed (examples come from default_rng([seed, "
                                    "split, index]))")
    num_train: int = field(6000, ge=8, help="train-split examples rendered; those of held-out "
                                            "pairs are dropped")
    num_test: int = field(1600, ge=8, help="test-split examples in the evaluation pool")
    heldout_pairs: tuple[str, ...] = field(
        ("circle:blue", "square:green", "triangle:yellow", "star:pink", "cross:orange"),
        help="'kind:colour' combinations removed from every training set; text prompts ask "
             "for exactly these")

    def validate(self) -> None:
        colours = ev.COLOUR_NAMES
        for pair in self.heldout_pairs:
            kind, _, colour = pair.partition(":")
            if kind not in datasets.SHAPE_KINDS or colour not in colours:
                raise self.invalid("heldout_pairs", f"entries 'kind:colour' with kind in "
                                   f"{', '.join(datasets.SHAPE_KINDS)} and colour in "
                                   f"{', '.join(colours)}; got {pair!r}")
        if not self.heldout_pairs:
            raise self.invalid("heldout_pairs", "at least one 'kind:colour' pair (text prompts)")


@dataclasses.dataclass(frozen=True)
class SEMStageConfig(Config):
    encoder: str = field(
        "dino", choices=SEM_ENCODERS,
        help="dino: the self-supervised ViT + SEM + DINO head (the paper's kind of encoder); "
             "attributes: a supervised control, the same ViT + SEM trained to predict the "
             "renderer's attributes from the code (generative.sem_supervised), with sem.dino's "
             "architecture and optimiser")
    dino: vd.DINOConfig = field(factory=vd.DINOConfig.cpu, help="ViT + SEM + DINO head")
    steps: int = field(1000, ge=1, help="encoder training steps")
    knn_k: int = field(20, ge=1, help="k of the kNN probe of the codes")


@dataclasses.dataclass(frozen=True)
class DiTStageConfig(Config):
    model: dit.DiTConfig = field(factory=dit.DiTConfig.cpu, help="DiT (code_length/vocab_size "
                                                                  "must match the SEM's L/V)")
    train: dit.DiTTrainConfig = field(factory=dit.DiTTrainConfig.cpu)
    steps: int = field(2000, ge=1, help="training steps of each DiT (equal compute)")


@dataclasses.dataclass(frozen=True)
class CodeStageConfig(Config):
    model: cd.CodeDenoiserConfig = field(factory=cd.CodeDenoiserConfig.small,
                                         help="MDLM denoiser (vocab_size/length are set from "
                                              "the SEM and the caption length)")
    steps: int = field(2000, ge=1, help="training steps of each code model")
    batch_size: int = field(128, ge=1)
    lr: float = field(1e-3, gt=0, help="AdamW peak learning rate (warmup, cosine decay)")
    warmup_steps: int = field(100, ge=0)
    weight_decay: float = field(0.01, ge=0)
    sample_steps: int = field(32, ge=1, help="MDLM ancestral sampling steps")
    temperature: float = field(1.0, gt=0, help="token temperature of MDLM sampling")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    num_samples: int = field(500, ge=4, help="images per sample set and per real set (R, B)")
    num_compose: int = field(200, ge=1, help="composed samples (pairs of parents)")
    num_prompts: int = field(200, ge=1, help="text prompts (held-out combinations; at most the "
                                             "number in the pool)")
    sample_steps: int = field(50, ge=1, help="Euler steps of DiT sampling")
    guidance: float = field(2.0, ge=0, help="classifier-free guidance scale of the DLC DiT")
    compose_temperature: float = field(0.5, gt=0, help="temperature of sample_code on the "
                                                       "averaged SEM distributions")
    sample_batch: int = field(250, ge=1, help="images per DiT sampling call")
    classifier_steps: int = field(1500, ge=1, help="attribute-CNN training steps")
    classifier_images: int = field(6000, ge=8, help="renders the attribute CNN trains on")
    classifier_batch: int = field(64, ge=2, help="attribute-CNN batch size")
    pr_k: int = field(3, ge=1, help="k of the precision/recall manifolds")
    fd_resamples: int = field(1000, ge=10, help="bootstrap resamples of each FD difference "
                                                "(generative.evaluation.frechet_difference_ci)")
    grid_images: int = field(64, ge=1, help="images per PNG grid")


@dataclasses.dataclass(frozen=True)
class DLCExpConfig(Config):
    seed: int = field(0, ge=0, help="model initialisation, batches and sampling")
    data: DataConfig = field(factory=DataConfig)
    sem: SEMStageConfig = field(factory=SEMStageConfig)
    dit: DiTStageConfig = field(factory=DiTStageConfig)
    codes: CodeStageConfig = field(factory=CodeStageConfig)
    eval: EvalConfig = field(factory=EvalConfig)

    def validate(self) -> None:
        s, m = self.sem.dino.sem, self.dit.model
        if (m.code_length, m.vocab_size) != (s.num_groups, s.group_size):
            raise ConfigError("dit.model.code_length", m.code_length,
                              f"dit.model.code_length/vocab_size ({m.code_length}/"
                              f"{m.vocab_size}) must equal the SEM's num_groups/group_size "
                              f"({s.num_groups}/{s.group_size})")
        if m.unconditional:
            raise ConfigError("dit.model.unconditional", True,
                              "must be false: the experiment trains both DiTs itself")


def smoke() -> DLCExpConfig:
    """Seconds: the whole pipeline at toy sizes (tiny ViT/SEM 4x8, tiny DiT, few steps)."""
    dino = dataclasses.replace(vd.DINOConfig.tiny(), sem=SEMConfig(num_groups=4, group_size=8),
                               batch_size=16, n_local=0)
    return DLCExpConfig(
        data=DataConfig(num_train=96, num_test=160),
        sem=SEMStageConfig(dino=dino, steps=4, knn_k=5),
        dit=DiTStageConfig(model=dataclasses.replace(dit.DiTConfig.tiny(), dim=32, depth=1,
                                                     heads=2, mlp_ratio=2),
                           train=dit.DiTTrainConfig(learning_rate=1e-3, batch_size=8,
                                                    ema_decay=0.9),
                           steps=4),
        codes=CodeStageConfig(model=dataclasses.replace(cd.CodeDenoiserConfig.tiny(), dim=32,
                                                        depth=1, heads=2),
                              steps=4, batch_size=8, warmup_steps=1, sample_steps=4),
        eval=EvalConfig(num_samples=12, num_compose=6, num_prompts=6, sample_steps=3,
                        fd_resamples=50, sample_batch=12, classifier_steps=4, classifier_images=64,
                        grid_images=12))


def cpu() -> DLCExpConfig:
    """Laptop scale: about 36 min on this 2-core machine shared with other jobs (load average
    5-7). Measured in the run of docs/dlc_results.md, stage by stage (s): data 20, attribute
    CNN 304, SEM encoder 244, DiT pair 1047 (1.02 s/step), code pair 338 (2.3 steps/s),
    samples 214, evaluation 9; 2179 s in all.

    6000 training renders (5157 after removing the held-out pairs), 1600 in the test pool;
    SEM codes of L=16 tokens over V=32 from the DINO cpu preset (ViT 4x64 on 8 px patches,
    Sinkhorn-Knopp teacher, KoLeo 0.1), 400 steps at batch 64; two DiTs of 4 blocks of width
    96 on 4 px patches (64 tokens), 1000 steps at batch 48 and lr 3e-3 each (side by side;
    the stage times above were measured at lr 5e-4, same cost per step); two MDLM code
    models of 3 blocks of width 96, 800 steps at batch 64; an attribute CNN trained 600 steps
    at batch 64 on 4000 renders; 400 images per evaluation set, 30 Euler steps with CFG 2.
    At this compute the DiTs draw coloured blobs, not clean shapes (FD ~30x the real-vs-real
    floor)."""
    dino = vd.DINOConfig.cpu()
    return DLCExpConfig(
        data=DataConfig(num_train=6000, num_test=1600),
        sem=SEMStageConfig(dino=dino, steps=400),
        dit=DiTStageConfig(model=dit.DiTConfig(patch_size=4, dim=96, depth=4, heads=4,
                                               time_features=128, code_length=16,
                                               vocab_size=32, cfg_dropout=0.1),
                           # 3e-3: a paired 600-step sweep of the unconditional DiT gave
                           # loss 0.221 / 0.182 / 0.167 at 5e-4 / 1.5e-3 / 3e-3 (the first cpu
                           # runs used 5e-4; docs/dlc_results.md)
                           train=dit.DiTTrainConfig(learning_rate=3e-3, warmup_steps=50,
                                                    batch_size=48, ema_decay=0.995),
                           steps=1000),
        codes=CodeStageConfig(model=cd.CodeDenoiserConfig(vocab_size=32, length=16, dim=96,
                                                          depth=3, heads=4, mlp_ratio=4),
                              steps=800, batch_size=64, warmup_steps=50, sample_steps=16),
        eval=EvalConfig(num_samples=400, num_compose=200, num_prompts=200, sample_steps=30,
                        sample_batch=200, classifier_steps=600, classifier_images=4000))


def control() -> DLCExpConfig:
    """The cpu preset with the supervised control encoder (``sem.encoder=attributes``): the same
    ViT + SEM trained 1500 steps (lr 2e-3, 100 warm-up steps) to predict the renderer's five
    attributes from the code, so the codes carry the image's content (at this size: colour,
    background and background colour >= 0.9 training accuracy, size ~0.7, kind ~0.35 of 5).
    Everything after the encoder (DiT pair with the same init, batches and noise, code
    models, evaluation) is the cpu preset's, so the two runs differ only in the codes.
    Measured on a quiet 2-core machine (s): encoder 127, DiT pair ~0.67 per step, codes 169,
    samples 114; about 25 min in all with the cpu preset's data and classifier stages (324 s).
    Results: docs/dlc_results.md (at lr 3e-3 the DiT uses these codes: reconstructions from
    real codes are closer to the real images than unconditional samples; prior codes not)."""
    base = cpu()
    dino = dataclasses.replace(base.sem.dino, lr=2e-3, warmup_steps=100)
    return dataclasses.replace(base, sem=dataclasses.replace(base.sem, encoder="attributes",
                                                             dino=dino, steps=1500))


def paper() -> DLCExpConfig:
    """The paper's scale, as a config for accelerators (not run here), following the official
    release (github.com/sarvghotra/DiscreteLatentCode: the DLC dataset and DiT it ships use codes
    of L=512 tokens over V=256, from a DINOv2 ViT-L/14 SEM encoder): SEM encoder ViT-L/14
    (width 1024, 24 blocks, 16 heads, 224 px; DINOv2 recipe: Sinkhorn-Knopp teacher, KoLeo 0.1)
    with SEM codes 512 x 256; DiT-XL/2 (28 blocks of width 1152, 16 heads, patch 2) conditioned
    on those codes with CFG dropout 0.1; a code generator of 12 blocks of width 768 over the
    512 codes after a 16-token caption prefix. Batch sizes, steps and learning rates follow DiT
    (lr 1e-4, batch 256, 400k steps) and DINO (batch 1024).

    Differences from the paper that remain, each a limit of this project's setting:
    the official SEM encoder is *fine-tuned* from pretrained DINOv2 weights (here trained from
    scratch: no weights are downloaded); its DiT runs on 32x32x4 SD-VAE latents (here pixels of
    the rendered shapes unless the data are replaced); its code prior is SEDD-absorb (here
    MDLM, the same absorbing forward process with a different training objective); its data
    are ImageNet-1k (here the rendered shapes, 1M images)."""
    vit = vd.ViTConfig(image_size=224, patch_size=14, dim=1024, depth=24, heads=16, mlp_ratio=4,
                       kernel_init="dino")
    dino = dataclasses.replace(vd.DINOConfig.paper(), vit=vit,
                               sem=SEMConfig(num_groups=512, group_size=256, tau=1.0),
                               global_size=224, local_size=98, centering="sinkhorn",
                               koleo_weight=0.1)
    dit_model = dataclasses.replace(dit.DiTConfig.paper(), code_length=512, vocab_size=256)
    return DLCExpConfig(
        data=DataConfig(num_train=1_000_000, num_test=50_000),
        sem=SEMStageConfig(dino=dino, steps=125_000),
        dit=DiTStageConfig(model=dit_model,
                           train=dit.DiTTrainConfig(learning_rate=1e-4, batch_size=256,
                                                    ema_decay=0.9999),
                           steps=400_000),
        codes=CodeStageConfig(model=cd.CodeDenoiserConfig(vocab_size=256, length=512 + 16, dim=768,
                                                          depth=12, heads=12),
                              steps=400_000, batch_size=512, lr=3e-4, warmup_steps=2500,
                              sample_steps=128),
        eval=EvalConfig(num_samples=50_000, num_compose=5000, num_prompts=5000,
                        sample_steps=250, guidance=1.5, sample_batch=500,
                        classifier_steps=20_000, classifier_images=200_000))


# --- pure helpers -----------------------------------------------------------------------------


def parse_pairs(pairs) -> list[tuple[int, int]]:
    """``'kind:colour'`` strings -> ``(kind index, colour index)`` (indices of
    :data:`generative.datasets.SHAPE_KINDS` and :data:`generative.evaluation.COLOUR_NAMES`)."""
    out = []
    for pair in pairs:
        kind, _, colour = pair.partition(":")
        if kind not in datasets.SHAPE_KINDS or colour not in ev.COLOUR_NAMES:
            raise ValueError(f"pair {pair!r}: expected 'kind:colour' with kind in "
                             f"{datasets.SHAPE_KINDS} and colour in {ev.COLOUR_NAMES}")
        out.append((datasets.SHAPE_KINDS.index(kind), ev.COLOUR_NAMES.index(colour)))
    return out


def heldout_mask(kind: np.ndarray, colour: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """bool ``[N]``: is ``(kind[n], colour[n])`` one of the held-out ``pairs``?"""
    kind, colour = np.asarray(kind), np.asarray(colour)
    out = np.zeros(kind.shape, bool)
    for k, c in pairs:
        out |= (kind == k) & (colour == c)
    return out


def marginal_chance(train_labels: np.ndarray, requested: np.ndarray, num_classes: int) -> float:
    """Chance level of an attribute accuracy: ``mean_n p_train(requested_n)``, the accuracy of
    a generator that ignores the request and draws the attribute from the training marginal
    ``p_train`` (frequencies of ``train_labels``)."""
    freq = np.bincount(np.asarray(train_labels), minlength=num_classes) / len(train_labels)
    return float(np.mean(freq[np.asarray(requested)]))


def pair_chance(train: dict[str, np.ndarray], requested: dict[str, np.ndarray]) -> float:
    """Chance of getting kind and colour both right by drawing each from its training marginal
    independently: ``mean_n p(kind_n) p(colour_n)`` (a held-out pair has training frequency 0,
    so the independent product is the only non-zero baseline)."""
    pk = np.bincount(train["kind"], minlength=ev.SHAPE_ATTRIBUTES["kind"]) / len(train["kind"])
    pc = (np.bincount(train["colour"], minlength=ev.SHAPE_ATTRIBUTES["colour"])
          / len(train["colour"]))
    return float(np.mean(pk[requested["kind"]] * pc[requested["colour"]]))


def composition_pairs(labels: dict[str, np.ndarray], candidates: np.ndarray, n: int,
                      seed: int) -> np.ndarray:
    """``[n, 2]`` indices (from ``candidates``) of parent pairs that differ in both kind and
    colour, drawn with a seeded generator (pairs may repeat when there are few candidates)."""
    rng = np.random.default_rng([seed, 17])
    cand = np.asarray(candidates)
    out = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        i, j = rng.choice(cand, 2, replace=False)
        if labels["kind"][i] != labels["kind"][j] and labels["colour"][i] != labels["colour"][j]:
            out.append((i, j))
    if len(out) < n:
        raise ValueError(f"found only {len(out)} of {n} parent pairs differing in kind and "
                         "colour; raise data.num_test")
    return np.asarray(out, np.int64)


# --- stage storage ----------------------------------------------------------------------------


def _pure(model: nnx.Module) -> Any:
    """The model's Params as nested dicts of numpy arrays (pickled in a stage)."""
    return _pure_tree(nnx.state(model, nnx.Param))


def _pure_tree(params: Any) -> Any:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _restore(make: Callable[[nnx.Rngs], nnx.Module], pure: Any) -> nnx.Module:
    """``make``'s module with the saved Params ``pure`` (built abstractly: no initialisation)."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))),
                                       nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(graphdef).__name__}: only Params can be restored here")
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, params, rest)


def Stages(run_dir: RunDir, resume: bool):
    """This experiment's stage store, ``<run>/checkpoints/<stage>/``
    (:class:`trainkit.checkpoint.StageStore`)."""
    from trainkit.checkpoint import StageStore

    return StageStore(run_dir.checkpoints_dir, resume, "dlc")


# --- stages -----------------------------------------------------------------------------------


def render_split(seed: int, split: str, num: int) -> tuple[np.ndarray, dict, list[str]]:
    """uint8 images ``[N, 32, 32, 3]``, classifier labels (:func:`shape_attribute_labels`) and
    captions of examples ``0..num-1`` of a shapes split."""
    examples = [datasets.shape_example(seed, split, i) for i in range(num)]
    images = np.stack([e["image"] for e in examples])
    raw = {k: np.array([e[k] for e in examples]) for k in datasets.SHAPE_FIELDS}
    return images, ev.shape_attribute_labels(raw), [e["caption"] for e in examples]


def stage_data(cfg: DLCExpConfig):
    d = cfg.data
    pairs = parse_pairs(d.heldout_pairs)
    tr_img, tr_lab, tr_cap = render_split(d.seed, "train", d.num_train)
    keep = ~heldout_mask(tr_lab["kind"], tr_lab["colour"], pairs)
    te_img, te_lab, te_cap = render_split(d.seed, "test", d.num_test)
    held = heldout_mask(te_lab["kind"], te_lab["colour"], pairs)
    seen_idx = np.flatnonzero(~held)
    n = cfg.eval.num_samples
    if len(seen_idx) < 2 * n:
        raise UserError(f"the test pool has {len(seen_idx)} seen-combination images; R and B "
                        f"need 2 x eval.num_samples = {2 * n}: raise data.num_test")
    held_idx = np.flatnonzero(held)[:cfg.eval.num_prompts]
    if len(held_idx) == 0:
        raise UserError("the test pool has no image of a held-out pair: raise data.num_test")
    arrays = {"train_images": tr_img[keep], "test_images": te_img,
              "train_captions": np.asarray(tr_cap)[keep], "test_captions": np.asarray(te_cap),
              "ref_idx": seen_idx[:n], "base_idx": seen_idx[n:2 * n], "prompt_idx": held_idx,
              "other_idx": seen_idx[2 * n:]}
    arrays.update({f"train_{k}": v[keep] for k, v in tr_lab.items()})
    arrays.update({f"test_{k}": v for k, v in te_lab.items()})
    info = {"num_train_rendered": d.num_train, "num_train": int(keep.sum()),
            "removed_heldout": int((~keep).sum()), "num_pool": d.num_test,
            "num_prompts": int(len(held_idx))}
    return arrays, None, info


def _images(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(127.5) - 1.0


def labels_of(data: dict, prefix: str, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    out = {h: data[f"{prefix}_{h}"] for h in HEADS}
    return out if idx is None else {h: v[idx] for h, v in out.items()}


def build_classifier(rngs: nnx.Rngs) -> ev.AttributeCNN:
    """The attribute CNN of :func:`generative.evaluation.train_attribute_classifier` (its
    default widths), for restoring saved parameters."""
    return ev.AttributeCNN(ev.SHAPE_ATTRIBUTES, rngs=rngs)


def stage_classifier(cfg: DLCExpConfig, data: dict, mesh=None):
    e = cfg.eval
    # separate renders of the full distribution (held-out pairs included): another data seed
    images, labels, _ = render_split(cfg.data.seed + 1000, "train", e.classifier_images)
    clf = ev.train_attribute_classifier(images, labels, jax.random.key(cfg.seed + 11),
                                        steps=e.classifier_steps, batch_size=e.classifier_batch,
                                        mesh=mesh)
    pool = _images(data["test_images"])
    acc = ev.attribute_accuracy(clf, pool, labels_of(data, "test"))
    return None, {"cnn": _pure(clf.model)}, {"pool_accuracy": acc}


def knn_probe(train_sem, train_tok, test_sem, test_tok, y_train, y_test, V, k) -> dict:
    out = {}
    for head in ("kind", "colour"):
        out[f"sem/{head}"] = vd.knn_accuracy(train_sem, y_train[head], test_sem, y_test[head], k,
                                             num_classes=ev.SHAPE_ATTRIBUTES[head])
        out[f"codes/{head}"] = vd.knn_accuracy(
            jax.nn.one_hot(train_tok, V), y_train[head], jax.nn.one_hot(test_tok, V),
            y_test[head], k, num_classes=ev.SHAPE_ATTRIBUTES[head])
    return out


def stage_sem(cfg: DLCExpConfig, data: dict, mesh=None):
    s = cfg.sem
    key = jax.random.key(cfg.seed + 1)
    train_x = _images(data["train_images"])
    test_x = _images(data["test_images"])
    y_tr, y_te = labels_of(data, "train"), labels_of(data, "test")
    k_model = jax.random.split(key)[0]  # the trained encoder's initialisation
    if s.encoder == "dino":
        encoder, hist = vd.train_sem_encoder(s.dino, train_x, key, s.steps, mesh=mesh)
        untrained = vd.DINOModel(s.dino, rngs=nnx.Rngs(params=k_model))
        loss = hist["dino_loss"]
        extra = {"log_K": math.log(s.dino.out_dim)}
    else:
        classes = dict(ev.SHAPE_ATTRIBUTES)
        encoder, hist = ss.train_attribute_sem_encoder(s.dino, train_x, y_tr, classes, key,
                                                       s.steps, mesh=mesh)
        untrained = ss.AttributeSEMEncoder(s.dino, classes, rngs=nnx.Rngs(params=k_model))
        loss = hist["loss"]
        extra = {"train_accuracy": {h: float(np.mean(hist[f"acc_{h}"][-50:])) for h in HEADS}}
    tr_tok, tr_sem = vd.extract_codes(encoder, train_x)
    te_tok, te_sem = vd.extract_codes(encoder, test_x)
    u_tr_tok, u_tr_sem = vd.extract_codes(untrained, train_x)
    u_te_tok, u_te_sem = vd.extract_codes(untrained, test_x)
    V = s.dino.sem.group_size
    k = min(s.knn_k, len(train_x))
    knn = {"trained": knn_probe(tr_sem, tr_tok, te_sem, te_tok, y_tr, y_te, V, k),
           "untrained": knn_probe(u_tr_sem, u_tr_tok, u_te_sem, u_te_tok, y_tr, y_te, V, k)}
    tr_tok, te_tok = np.asarray(tr_tok), np.asarray(te_tok)
    info = {"encoder": s.encoder, "knn": knn, "k": k,
            "distinct_codes_train": int(len(np.unique(tr_tok, axis=0))),
            "distinct_codes_untrained": int(len(np.unique(np.asarray(u_tr_tok), axis=0))),
            "num_train": int(len(tr_tok)),
            "tokens_used": int(len(np.unique(tr_tok))),
            "mean_max_prob": float(np.mean(np.max(np.asarray(te_sem), axis=-1))),
            "loss_first": float(np.mean(loss[:20])),
            "loss_last": float(np.mean(loss[-20:])), **extra}
    arrays = {"train_codes": tr_tok, "test_codes": te_tok,
              "test_sem": np.asarray(te_sem, np.float32),
              **{f"hist_{k_}": np.asarray(v) for k_, v in hist.items()}}
    return arrays, {"teacher": _pure(encoder)}, info


def dit_config(cfg: DLCExpConfig) -> dit.DiTConfig:
    """The one DiT architecture of both generators (the unconditional one is the same network
    fed the null code always)."""
    return cfg.dit.model


def init_params(make: Callable[[nnx.Rngs], nnx.Module], keys: jax.Array):
    """``(graphdef, params)`` of ``make(rngs)`` initialised from each of ``keys [M]``, stacked
    on a leading model axis, in one ``jit`` (one compilation instead of one per parameter
    shape)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))), nnx.Param)
    params = jax.jit(jax.vmap(lambda k: nnx.state(make(nnx.Rngs(params=k)), nnx.Param)))(keys)
    return graphdef, params


def unstack(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def train_dit_pair(cfg: DLCExpConfig, images: np.ndarray, codes: np.ndarray, key: jax.Array,
                   mesh=None):
    """Train the unconditional and the DLC DiT side by side (one ``vmap``-ped step, one
    compiled program): the same initial parameters, the same batches, times and noise at every
    step; the only difference is the code-dropout probability, 1 for the unconditional model
    (its input is the null code always) and ``model.cfg_dropout`` for the DLC model. Each update
    is :func:`generative.dit.make_train_step`'s step (flow matching, guarded AdamW, EMA) with
    the dropout probability vmapped.

    Returns ``(params [2], losses [steps, 2])``, the EMA (or last) parameters stacked in the
    order (unconditional, DLC). ``mesh``: each batch split over its devices, the state
    replicated (:func:`trainkit.sharding.spread_batch`); the parameters come back as this
    process's own copy."""
    d = cfg.dit
    mcfg, tr = dit_config(cfg), d.train
    k_init, k_loop = jax.random.split(key)
    # the same initial parameters for both models
    graphdef, params = init_params(lambda r: dit.DiT(mcfg, rngs=r), jnp.stack([k_init, k_init]))
    optimizer = dit.make_optimizer(tr)
    use_ema = tr.ema_decay > 0
    state = jax.vmap(lambda p: dit.init_train_state(p, optimizer, ema=use_ema))(params)
    drop_p = jnp.asarray([1.0, mcfg.cfg_dropout], jnp.float32)
    x_all = jnp.asarray(_images(images))
    c_all = jnp.asarray(codes, jnp.int32)
    n, bs = x_all.shape[0], tr.batch_size
    state, x_all, c_all, drop_p = replicate((state, x_all, c_all, drop_p), mesh)

    one = dit.make_train_step(graphdef, optimizer, ema_decay=tr.ema_decay,
                              time_sampling=tr.time_sampling)

    @jax.jit
    def step(state, key):
        k_idx, k_step = jax.random.split(key)
        idx = spread_batch(jax.random.choice(k_idx, n, (bs,), replace=bs > n), mesh)
        return jax.vmap(one, in_axes=(0, None, None, None, 0))(state, k_step, x_all[idx],
                                                               c_all[idx], drop_p)

    bar = Progress(d.steps, desc="DiT unconditional + DLC", key_metric="loss")
    losses = np.zeros((d.steps, 2))
    keys = replicate(jax.random.split(k_loop, d.steps), mesh)
    for i in range(d.steps):
        state, metrics = step(state, keys[i])
        if (i + 1) % 10 == 0 or i + 1 == d.steps:
            m = jax.tree.map(to_host, metrics)
            guards.check_streak(m, 20, step=i + 1)
            bar.update(i + 1, m)
        losses[i] = to_host(metrics["loss"])
    bar.close()
    return local_replica(state.ema if use_ema else state.params), losses


def stage_dit(cfg: DLCExpConfig, data: dict, codes: np.ndarray, mesh=None):
    params, losses = train_dit_pair(cfg, data["train_images"], codes,
                                    jax.random.key(cfg.seed + 2), mesh)
    info = {name: {"loss_first": float(np.mean(losses[:20, i])),
                   "loss_last": float(np.mean(losses[-50:, i]))}
            for i, name in enumerate(("uncond", "dlc"))}
    return ({"losses": losses}, {"uncond": _pure_tree(unstack(params, 0)),
                                 "dlc": _pure_tree(unstack(params, 1))}, info)


def code_model_config(cfg: DLCExpConfig, prefix_len: int, extra: int) -> cd.CodeDenoiserConfig:
    s = cfg.sem.dino.sem
    return dataclasses.replace(cfg.codes.model, vocab_size=s.group_size,
                               length=prefix_len + s.num_groups, extra_tokens=extra)


def code_sequences(cfg: DLCExpConfig, data: dict, codes: np.ndarray
                   ) -> tuple[np.ndarray, tuple[str, ...], int]:
    """``[2, N, P + L]`` training sequences of the two code models and the caption vocabulary
    and prefix length: row 0 (the unconditional prior) is an all-``<pad>`` prefix + code, row 1
    (text-to-code) the caption's word ids + code. A constant prefix carries no information, so
    model 0 is an unconditional MDLM over the ``L`` tokens, with the architecture of model 1."""
    captions = [str(c) for c in data["train_captions"]]
    vocab = dlc.caption_vocabulary(captions)
    plen = max(len(dlc.caption_words(c)) for c in captions)
    V = cfg.sem.dino.sem.group_size
    prefix = dlc.encode_captions(captions, vocab, plen, offset=V + 1)
    pad = np.full_like(prefix, V + 1)
    seqs = np.stack([np.concatenate([pad, codes], 1), np.concatenate([prefix, codes], 1)])
    return seqs.astype(np.int32), vocab, plen


def train_code_pair(cfg: DLCExpConfig, seqs: np.ndarray, plen: int, extra: int, key: jax.Array,
                    mesh=None):
    """Train the MDLM code prior and the text-to-code model side by side (one ``vmap``-ped
    step over ``seqs [2, N, P + L]``; own initialisations, the same batches and masks).
    Returns ``(params [2], losses [steps, 2])``; ``mesh`` as in :func:`train_dit_pair`."""
    c = cfg.codes
    mcfg = code_model_config(cfg, plen, extra)
    k_init, k_loop = jax.random.split(key)
    graphdef, params = init_params(lambda r: cd.CodeDenoiser(mcfg, rngs=r),
                                   jax.random.split(k_init, 2))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.lr, max(min(c.warmup_steps, c.steps - 1), 1), max(c.steps, 2))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=c.weight_decay))
    opt_state = jax.vmap(optimizer.init)(params)
    maskable = np.arange(seqs.shape[2]) >= plen
    one = cd.make_train_step(graphdef, optimizer, maskable=maskable)
    data = jnp.asarray(seqs, jnp.int32)
    n, bs = data.shape[1], c.batch_size
    params, opt_state, data = replicate((params, opt_state, data), mesh)

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_step = jax.random.split(key)
        idx = spread_batch(jax.random.choice(k_idx, n, (bs,), replace=bs > n), mesh)
        return jax.vmap(one, in_axes=(0, 0, None, 0))(params, opt_state, k_step, data[:, idx])

    bar = Progress(c.steps, desc="code prior + text-to-code", key_metric="loss")
    losses = np.zeros((c.steps, 2))
    keys = replicate(jax.random.split(k_loop, c.steps), mesh)
    for i in range(c.steps):
        params, opt_state, metrics = step(params, opt_state, keys[i])
        losses[i] = to_host(metrics["loss"])
        if (i + 1) % 25 == 0 or i + 1 == c.steps:
            bar.update(i + 1, {"loss": losses[i]})
    bar.close()
    return local_replica(params), losses


def stage_codes(cfg: DLCExpConfig, data: dict, sem: dict, mesh=None):
    seqs, vocab, plen = code_sequences(cfg, data, sem["train_codes"])
    params, losses = train_code_pair(cfg, seqs, plen, len(vocab), jax.random.key(cfg.seed + 3),
                                     mesh)
    info = {name: {"loss_first": float(np.mean(losses[:20, i])),
                   "loss_last": float(np.mean(losses[-50:, i]))}
            for i, name in enumerate(("prior", "text2code"))}
    info.update(vocab=list(vocab), prefix_length=plen)
    return ({"losses": losses}, {"prior": _pure_tree(unstack(params, 0)),
                                 "text2code": _pure_tree(unstack(params, 1))}, info)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def decode_codes(model: dit.DiT, key: jax.Array, codes: np.ndarray | None, n: int,
                 cfg: DLCExpConfig, guidance: float) -> np.ndarray:
    """``n`` DiT samples (uint8) in batches of exactly ``eval.sample_batch`` (the last one
    padded, so one compiled sampler serves every set); ``codes=None``: the null code."""
    e = cfg.eval
    bs = e.sample_batch
    out = []
    for i, start in enumerate(range(0, n, bs)):
        k = jax.random.fold_in(key, i)
        if codes is None:
            x = dit.sample(model, k, None, steps=e.sample_steps, num_samples=bs)
        else:
            c = _pad_rows(np.asarray(codes[start:start + bs]), bs)
            x = dit.sample(model, k, jnp.asarray(c), steps=e.sample_steps,
                           guidance_scale=guidance)
        out.append(ev.to_uint8(np.asarray(x))[:min(bs, n - start)])
    return np.concatenate(out)[:n]


def mdlm_codes(model: cd.CodeDenoiser, key: jax.Array, prefix: np.ndarray, cfg: DLCExpConfig
               ) -> np.ndarray:
    """Codes ``[n, L]`` from an MDLM code model after the never-masked prefixes ``[n, P]``
    (:func:`generative.discrete_diffusion.sample`; batches of ``eval.sample_batch``)."""
    c, bs = cfg.codes, cfg.eval.sample_batch
    graphdef, state = nnx.split(model)
    out = []
    for i, start in enumerate(range(0, len(prefix), bs)):
        pre = _pad_rows(np.asarray(prefix[start:start + bs], np.int32), bs)
        out.append(np.asarray(_draw_codes(graphdef, state, jax.random.fold_in(key, i),
                                          jnp.asarray(pre), cfg.sem.dino.sem.num_groups,
                                          c.sample_steps, c.temperature)))
    return np.concatenate(out)[:len(prefix)]


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _draw_codes(graphdef, state, key, prefix, L: int, steps: int, temperature: float):
    m = nnx.merge(graphdef, state)
    return dd.sample(key, m, L, steps, m.config.mask_id, batch_size=prefix.shape[0],
                     prefix=prefix, temperature=temperature)


@functools.partial(jax.jit, static_argnums=2)
def compose_and_sample(key: jax.Array, dists: jax.Array, temperature: float) -> jax.Array:
    """Composed codes of parent pairs: ``dists [n, 2, L, V]`` SEM distributions ->
    :func:`generative.dlc.compose` (equal weights) -> :func:`generative.dlc.sample_code` at
    ``temperature``, one key per pair. int32 ``[n, L]``."""
    keys = jax.random.split(key, dists.shape[0])
    return jax.vmap(lambda k, d: dlc.sample_code(k, dlc.compose(d), temperature))(keys, dists)


def stage_samples(cfg: DLCExpConfig, data: dict, sem: dict, models: dict, codes_info: dict):
    e = cfg.eval
    V = cfg.sem.dino.sem.group_size
    key = jax.random.key(cfg.seed + 5)
    k = lambda i: jax.random.fold_in(key, i)  # noqa: E731
    n = e.num_samples
    vocab, plen = tuple(codes_info["vocab"]), int(codes_info["prefix_length"])
    out: dict[str, np.ndarray] = {}
    timing = {}
    # (a) unconditional
    t0 = time.time()
    out["uncond_images"] = decode_codes(models["uncond"], k(0), None, n, cfg, 1.0)
    timing["uncond"] = time.time() - t0
    # (b) MDLM prior codes (all-<pad> prefix) -> DLC DiT
    t0 = time.time()
    out["prior_codes"] = mdlm_codes(models["prior"], k(1), np.full((n, plen), V + 1), cfg)
    out["prior_images"] = decode_codes(models["dlc"], k(2), out["prior_codes"], n, cfg,
                                       e.guidance)
    timing["prior"] = time.time() - t0
    # (c) codes of the real images of B
    t0 = time.time()
    out["recon_codes"] = sem["test_codes"][data["base_idx"]]
    out["recon_images"] = decode_codes(models["dlc"], k(3), out["recon_codes"], n, cfg,
                                       e.guidance)
    timing["recon"] = time.time() - t0
    # (d) composition of two parents differing in kind and colour (from the pool beyond R)
    t0 = time.time()
    test_lab = labels_of(data, "test")
    cand = np.concatenate([data["base_idx"], data["other_idx"]])
    parents = composition_pairs(test_lab, cand, e.num_compose, cfg.seed)
    out["compose_codes"] = np.asarray(compose_and_sample(
        k(4), jnp.asarray(sem["test_sem"][parents]), float(e.compose_temperature)))
    out["compose_parents"] = parents
    out["compose_images"] = decode_codes(models["dlc"], k(5), out["compose_codes"],
                                         len(parents), cfg, e.guidance)
    timing["compose"] = time.time() - t0
    # (e) text -> code -> image on held-out combinations
    t0 = time.time()
    prompts = [str(c) for c in data["test_captions"][data["prompt_idx"]]]
    prefix = dlc.encode_captions(prompts, vocab, plen, offset=V + 1)
    out["text_codes"] = mdlm_codes(models["text2code"], k(6), prefix, cfg)
    out["text_images"] = decode_codes(models["dlc"], k(7), out["text_codes"], len(prompts),
                                      cfg, e.guidance)
    timing["text"] = time.time() - t0
    pc = sem["test_codes"][parents]  # [n, 2, L]: the parents' own codes
    info = {"seconds_per_set": {s: round(v, 1) for s, v in timing.items()},
            "compose_token_share": {
                "parent_a": float(np.mean(out["compose_codes"] == pc[:, 0])),
                "parent_b": float(np.mean(out["compose_codes"] == pc[:, 1])),
                "either": float(np.mean((out["compose_codes"] == pc[:, 0])
                                        | (out["compose_codes"] == pc[:, 1])))},
            "prior_codes_in_train": float(np.mean(_rows_in(out["prior_codes"],
                                                           sem["train_codes"]))),
            "text_codes_in_train": float(np.mean(_rows_in(out["text_codes"],
                                                          sem["train_codes"])))}
    return out, None, info


def _rows_in(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """bool ``[N]``: is each row of ``rows`` a row of ``table`` (memorised code)?"""
    seen = {r.tobytes() for r in np.ascontiguousarray(table)}
    return np.array([r.tobytes() in seen for r in np.ascontiguousarray(rows)])


def stage_eval(cfg: DLCExpConfig, data: dict, samples: dict, clf: ev.AttributeClassifier):
    e = cfg.eval
    feats = lambda x: clf.features(x)  # noqa: E731
    test = data["test_images"]
    f_ref = feats(test[data["ref_idx"]])
    sets = {"real": test[data["base_idx"]]}
    sets.update({s: samples[f"{s}_images"] for s in ("uncond", "prior", "recon")})
    dist, f_sets = {}, {}
    for name, imgs in sets.items():
        f = f_sets[name] = feats(imgs)
        p, r = ev.precision_recall(f_ref, f, k=min(e.pr_k, len(f) - 1, len(f_ref) - 1))
        dist[name] = {"fd": ev.feature_frechet_distance(f_ref, f), "precision": p, "recall": r}
    fd_diff = {}
    for a, b in FD_COMPARISONS:
        d, low, high = ev.frechet_difference_ci(f_ref, f_sets[a], f_sets[b],
                                                num_resamples=e.fd_resamples, seed=cfg.seed)
        fd_diff[f"{a}-{b}"] = {"diff": d, "low": low, "high": high}
    train_lab = labels_of(data, "train")
    test_lab = labels_of(data, "test")

    def acc_table(images, requested):
        acc = ev.attribute_accuracy(clf, images, requested)
        chance = {h: marginal_chance(train_lab[h], requested[h], ev.SHAPE_ATTRIBUTES[h])
                  for h in requested}
        pred = clf.predict(images)
        pair = float(np.mean((pred["kind"] == requested["kind"])
                             & (pred["colour"] == requested["colour"])))
        return {"accuracy": acc, "chance": chance, "kind+colour": pair,
                "kind+colour_chance": pair_chance(train_lab, requested)}

    attrs = {"recon": acc_table(samples["recon_images"], {h: v[data["base_idx"]]
                                                         for h, v in test_lab.items()}),
             "text": acc_table(samples["text_images"], {h: v[data["prompt_idx"]]
                                                       for h, v in test_lab.items()})}
    parents = samples["compose_parents"]
    comp = {}
    pred = clf.predict(samples["compose_images"])
    for h in HEADS:
        a, b = test_lab[h][parents[:, 0]], test_lab[h][parents[:, 1]]
        comp[h] = {"parent_a": float(np.mean(pred[h] == a)),
                   "parent_b": float(np.mean(pred[h] == b)),
                   "either": float(np.mean((pred[h] == a) | (pred[h] == b))),
                   "chance_either": float(np.mean(_either_chance(train_lab[h], a, b,
                                                                 ev.SHAPE_ATTRIBUTES[h])))}
    attrs["compose"] = comp
    # the classifier on real images of the pool: how far its readings can be trusted
    real_pred_acc = ev.attribute_accuracy(clf, test[data["prompt_idx"]],
                                          {h: v[data["prompt_idx"]] for h, v in test_lab.items()})
    info = {"distance": dist, "fd_difference": fd_diff, "attributes": attrs,
            "classifier_on_heldout_real": real_pred_acc,
            "num": {"R": int(len(f_ref)), **{s: int(len(v)) for s, v in sets.items()},
                    "compose": int(len(parents)), "text": int(len(data["prompt_idx"]))}}
    return None, None, info


def _either_chance(train_labels, a, b, num_classes) -> np.ndarray:
    freq = np.bincount(np.asarray(train_labels), minlength=num_classes) / len(train_labels)
    return freq[a] + np.where(a != b, freq[b], 0.0)


# --- run --------------------------------------------------------------------------------------


def run(cfg: DLCExpConfig, ctx: RunContext) -> RunResult:
    if ctx.seeds != 1:
        raise UserError("dlc runs one pipeline per run; use --set seed=N for other seeds")
    sizes = {"sem.dino.vit.image_size": cfg.sem.dino.vit.image_size,
             "dit.model.image_size": cfg.dit.model.image_size}
    for key, size in sizes.items():
        if size != datasets.IMAGE_SIZE:
            raise UserError(f"{key} = {size}, but the shapes images are {datasets.IMAGE_SIZE}x"
                            f"{datasets.IMAGE_SIZE} (the paper preset describes the paper's "
                            "224 px ImageNet setting and cannot run on them)")
    # Several processes: the training stages split every batch over all devices (the state
    # replicated); data rendering, sampling and evaluation run on every process alone.
    mesh = make_mesh(data=-1) if jax.process_count() > 1 else None
    st = Stages(ctx.run_dir, ctx.resume)
    t_start = time.time()
    data, _, data_info = st.run("data", lambda: stage_data(cfg))
    _, clf_params, clf_info = st.run("classifier", lambda: stage_classifier(cfg, data, mesh))
    clf = ev.AttributeClassifier(_restore(build_classifier, clf_params["cnn"]),
                                 dict(ev.SHAPE_ATTRIBUTES))
    sem, sem_params, sem_info = st.run("sem", lambda: stage_sem(cfg, data, mesh))
    _, dit_params, _ = st.run("dit", lambda: stage_dit(cfg, data, sem["train_codes"], mesh))
    _, code_params, codes_info = st.run("codes", lambda: stage_codes(cfg, data, sem, mesh))
    mcfg = code_model_config(cfg, int(codes_info["prefix_length"]), len(codes_info["vocab"]))
    models = {name: _restore(lambda r: dit.DiT(dit_config(cfg), rngs=r), dit_params[name])
              for name in ("uncond", "dlc")}
    models.update({name: _restore(lambda r: cd.CodeDenoiser(mcfg, rngs=r), code_params[name])
                   for name in ("prior", "text2code")})
    samples, _, samples_info = st.run("samples",
                                      lambda: stage_samples(cfg, data, sem, models, codes_info))
    _, _, ev_info = st.run("eval", lambda: stage_eval(cfg, data, samples, clf))
    if is_main_process():
        write_json(ctx.run_dir.path / "stages.json",
                   {"stages": st.log,
                    "seconds": {s: read_json(st.root / s / "done.json")["seconds"] for s in STAGES},
                    "wall_this_run": round(time.time() - t_start, 1)})
    metrics = flat_metrics(ev_info, sem_info)
    params = {"classifier": clf_params, "sem": sem_params, "dit": dit_params,
              "codes": code_params}
    steps = cfg.sem.steps + 2 * cfg.dit.steps + 2 * cfg.codes.steps
    return RunResult(params=params, metrics=metrics, steps=steps)


def flat_metrics(ev_info: dict, sem_info: dict) -> dict[str, float]:
    """The summary's final metrics: distances, attribute accuracies and kNN probes."""
    m: dict[str, float] = {}
    for name, d in ev_info["distance"].items():
        for key, v in d.items():
            m[f"{name}/{key}"] = float(v)
    for pair, d in ev_info.get("fd_difference", {}).items():
        for key, v in d.items():
            m[f"fd_difference/{pair}/{key}"] = float(v)
    for name in ("recon", "text"):
        a = ev_info["attributes"][name]
        for h, v in a["accuracy"].items():
            m[f"{name}/acc/{h}"] = float(v)
        for h, v in a["chance"].items():
            m[f"{name}/chance/{h}"] = float(v)
        m[f"{name}/acc/kind+colour"] = float(a["kind+colour"])
        m[f"{name}/chance/kind+colour"] = float(a["kind+colour_chance"])
    for h, d in ev_info["attributes"]["compose"].items():
        for key, v in d.items():
            m[f"compose/{h}/{key}"] = float(v)
    for which, probe in sem_info["knn"].items():
        for key, v in probe.items():
            m[f"sem_knn/{which}/{key}"] = float(v)
    return m


# --- report -----------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def fd_verdict(low: float, high: float) -> str:
    """Reading of an interval on FD(A) - FD(B): only an interval that excludes 0 decides."""
    return "lower" if high < 0 else "higher" if low > 0 else "not distinguishable"


def distance_sentence(dist: dict, fd_diff: dict | None = None) -> str:
    """The paper's claim (prior-code samples closer to real images than the unconditional DiT's,
    at equal compute), read from the interval on the FD difference of this run."""
    a, b, c, r = (dist[k]["fd"] for k in ("uncond", "prior", "recon", "real"))
    if fd_diff:
        d = fd_diff["prior-uncond"]
        v = fd_verdict(d["low"], d["high"])
        relation = "from" if v == "not distinguishable" else "than"
        claim = (f"Samples from codes drawn from the MDLM prior (the paper's claim) are "
                 f"**{v}** in {FD_NAME} {relation} the unconditional DiT's at equal compute: "
                 f"{b:.2f} vs {a:.2f}, difference {d['diff']:+.2f} "
                 f"[{d['low']:+.2f}, {d['high']:+.2f}] (basic bootstrap 95% over R and both "
                 f"sample sets; one seed, so not yet a verdict).")
    else:
        claim = (f"Samples from codes drawn from the MDLM prior (the paper's claim): {b:.2f} "
                 f"against the unconditional DiT's {a:.2f} (this run predates the intervals).")
    return (claim + f" Reconstruction from the codes of *real* images (the DiT told what to "
            f"draw; not the paper's claim) is at {c:.2f}, and two disjoint real sets are "
            f"{r:.2f} apart (the floor at this sample size). Precision / recall: unconditional "
            f"{dist['uncond']['precision']:.2f} / {dist['uncond']['recall']:.2f}, DLC prior "
            f"{dist['prior']['precision']:.2f} / {dist['prior']['recall']:.2f}."
            + (f" Every generated set is at least {min(a, b, c) / max(r, 1e-12):.0f}x farther from "
               f"R than the real floor: at this compute the DiTs do not yet draw clean shapes "
               f"(see the grids), so these differences say little about the paper's claim."
               if min(a, b, c) > 5 * r else ""))


def attribute_sentence(attrs: dict) -> str:
    t, c = attrs["text"], attrs["compose"]
    parts = []
    for h in ("kind", "colour"):
        acc, ch = t["accuracy"][h], t["chance"][h]
        parts.append(f"{h} {acc:.2f} (chance {ch:.2f}, {'above' if acc > ch else 'not above'})")
    txt = ("Text-to-image on held-out (kind, colour) combinations reads back the requested "
           + ", ".join(parts) + f"; both kind and colour right in {t['kind+colour']:.2f} of the "
           f"samples (independent-marginal chance {t['kind+colour_chance']:.3f}).")
    comp = ("Composed samples carry a parent's attribute: "
            + ", ".join(f"{h} of either parent {c[h]['either']:.2f} (chance "
                        f"{c[h]['chance_either']:.2f}; A {c[h]['parent_a']:.2f}, B "
                        f"{c[h]['parent_b']:.2f})" for h in ("kind", "colour")) + ".")
    return txt + " " + comp


def knn_sentence(sem_info: dict) -> str:
    """What the SEM encoder learned, per attribute, from the kNN probes (trained - untrained)."""
    tr, un = sem_info["knn"]["trained"], sem_info["knn"]["untrained"]
    verdicts = []
    for head in ("kind", "colour"):
        dc, ds = tr[f"codes/{head}"] - un[f"codes/{head}"], tr[f"sem/{head}"] - un[f"sem/{head}"]
        word = ("beats" if min(dc, ds) > 0.02 else "does not beat" if max(dc, ds) < 0.02
                else "is mixed against")
        verdicts.append(f"on {head} the trained encoder {word} the untrained one (codes "
                        f"{tr[f'codes/{head}']:.3f} vs {un[f'codes/{head}']:.3f}, SEM "
                        f"{tr[f'sem/{head}']:.3f} vs {un[f'sem/{head}']:.3f})")
    codes = (f"{sem_info['distinct_codes_train']} distinct codes over "
             f"{sem_info['num_train']} training images ({sem_info['distinct_codes_untrained']} "
             f"untrained), {sem_info['tokens_used']} tokens used, mean max SEM probability "
             f"{sem_info['mean_max_prob']:.2f}.")
    head = f"SEM encoder, kNN (k={sem_info['k']}) accuracy: " + "; ".join(verdicts) + ". "
    if sem_info.get("encoder", "dino") == "attributes":
        acc = ", ".join(f"{h} {a:.2f}" for h, a in sem_info["train_accuracy"].items())
        return (head + f"Supervised control (not the paper's self-supervised encoder): the "
                f"ViT + SEM was trained to predict the renderer's attributes from its code; "
                f"cross-entropy summed over the attributes {sem_info['loss_first']:.2f} -> "
                f"{sem_info['loss_last']:.2f}, final training accuracy read from the code: "
                f"{acc}. " + codes + " The codes carry what those accuracies say, and the DiT "
                "is conditioned on that.")
    return (head + f"DINO loss {sem_info['loss_first']:.2f} -> {sem_info['loss_last']:.2f} "
            f"(uniform solution log K = {sem_info['log_K']:.2f}); " + codes
            + " Self-distillation at this scale barely moves the encoder away from a random "
            "ViT (the known state of generative.vit_dino; see the strict xfail in "
            "tests/generative/test_vit_dino.py): the codes carry little more than a random "
            "projection of the image does, and that is what the DiT is conditioned on.")


def report(run_dir: RunDir) -> str:
    cfg = load_json(DLCExpConfig, run_dir.config_path)
    st = Stages(run_dir, resume=True)
    root = st.root
    need = [s for s in STAGES if not (root / s / "done.json").exists()]
    if need:
        text = (f"# dlc: Discrete Latent Codes on shapes\n\nThe run is not finished: stages "
                f"{', '.join(need)} have no output yet.\n")
        run_dir.report_path.write_text(text)
        return str(run_dir.report_path)
    data, _, data_info = st.load("data")
    sem, _, sem_info = st.load("sem")
    samples, _, samples_info = st.load("samples")
    _, _, ev_info = st.load("eval")
    _, _, clf_info = st.load("classifier")
    dist, attrs = ev_info["distance"], ev_info["attributes"]
    plots_dir = run_dir.plots_dir
    # grids
    g = cfg.eval.grid_images
    grids = {"real": data["test_images"][data["base_idx"]][:g]}
    for s in SAMPLE_SETS:
        grids[s] = samples[f"{s}_images"][:g]
    figures = []
    for name, imgs in grids.items():
        path = plots_dir / f"grid_{name}.png"
        ev.save_grid(imgs, path, nrow=8)
        figures.append((SET_TITLES[name], path))
    # composition: parent A | parent B | sample, one triple per row
    par = samples["compose_parents"][:8]
    trip = np.stack([data["test_images"][par[:, 0]], data["test_images"][par[:, 1]],
                     samples["compose_images"][:8]], axis=1).reshape(-1, 32, 32, 3)
    path = plots_dir / "compose_triples.png"
    ev.save_grid(trip, path, nrow=3)
    figures.append(("composition: parent A, parent B, composed sample (one row each)", path))
    # losses
    dit_losses = st.load("dit")[0]["losses"]
    steps_d = np.arange(1, len(dit_losses) + 1)
    p = plots.learning_curves(plots_dir / "dit_loss.png",
                              {"DiT unconditional": (steps_d, _smooth(dit_losses[:, 0])),
                               "DiT DLC": (steps_d, _smooth(dit_losses[:, 1]))},
                              ylabel="flow-matching loss (smoothed)",
                              title="dlc: DiT training (same batches, noise and init)")
    figures.append(("DiT training loss (equal compute)", p))
    code_losses = st.load("codes")[0]["losses"]
    steps_c = np.arange(1, len(code_losses) + 1)
    logv = math.log(cfg.sem.dino.sem.group_size)
    p = plots.learning_curves(plots_dir / "code_loss.png",
                              {"MDLM code prior": (steps_c, _smooth(code_losses[:, 0])),
                               "text-to-code": (steps_c, _smooth(code_losses[:, 1]))},
                              ylabel="MDLM NELBO per code token (nats, smoothed)",
                              title="dlc: code generators",
                              references={f"log V = {logv:.2f} (uniform tokens)": logv})
    figures.append(("code generators", p))
    if sem_info.get("encoder", "dino") == "dino":
        p = plots.learning_curves(plots_dir / "dino_loss.png",
                                  {"DINO loss": (np.arange(1, len(sem["hist_dino_loss"]) + 1),
                                                 _smooth(sem["hist_dino_loss"]))},
                                  ylabel="DINO cross-entropy", title="dlc: SEM encoder",
                                  references={"log K (uniform)": sem_info["log_K"]})
        figures.append(("SEM encoder (DINO) loss", p))
    else:
        steps_s = np.arange(1, len(sem["hist_loss"]) + 1)
        p = plots.learning_curves(plots_dir / "sem_accuracy.png",
                                  {h: (steps_s, _smooth(sem[f"hist_acc_{h}"])) for h in HEADS},
                                  ylabel="training accuracy read from the code (smoothed)",
                                  title="dlc: SEM encoder (supervised control)")
        figures.append(("SEM encoder (supervised control): attribute accuracy from the code", p))

    dist_rows = [[SET_TITLES[k], ev_info["num"][k], _fmt(dist[k]["fd"], 2),
                  _fmt(dist[k]["precision"]), _fmt(dist[k]["recall"])]
                 for k in ("real", "uncond", "prior", "recon")]
    dist_table = plots.markdown_table(dist_rows, ["set (against R)", "images", FD_NAME,
                                                  "precision", "recall"])
    fd_diff = ev_info.get("fd_difference")
    if fd_diff:
        diff_rows = []
        for a, b in FD_COMPARISONS:
            d = fd_diff[f"{a}-{b}"]
            diff_rows.append([f"{SET_TITLES[a]} - {SET_TITLES[b]}", _fmt(d["diff"], 2),
                              f"[{_fmt(d['low'], 2)}, {_fmt(d['high'], 2)}]",
                              fd_verdict(d["low"], d["high"])])
        dist_table += ("\n\nDifferences in FD against R (negative: the first set is closer), "
                       f"basic bootstrap 95% over R and both sets ({cfg.eval.fd_resamples} "
                       "resamples, `generative.evaluation.frechet_difference_ci`):\n\n"
                       + plots.markdown_table(diff_rows, ["A - B", "FD difference", "95% interval",
                                                          "A is"]))
    attr_rows = []
    for name in ("recon", "text"):
        a = attrs[name]
        attr_rows.append([SET_TITLES[name]] + [f"{_fmt(a['accuracy'][h])} ({_fmt(a['chance'][h])})"
                                               for h in HEADS]
                         + [f"{_fmt(a['kind+colour'])} ({_fmt(a['kind+colour_chance'])})"])
    real_acc = ev_info["classifier_on_heldout_real"]
    attr_rows.append(["classifier on the real prompt images"] + [_fmt(real_acc[h]) for h in HEADS]
                     + ["-"])
    attr_table = plots.markdown_table(attr_rows, ["set: accuracy (chance)"] + list(HEADS)
                                      + ["kind+colour"])
    comp_rows = [[h, _fmt(c["parent_a"]), _fmt(c["parent_b"]), _fmt(c["either"]),
                  _fmt(c["chance_either"])] for h, c in attrs["compose"].items()]
    comp_table = plots.markdown_table(comp_rows, ["attribute", "= parent A", "= parent B",
                                                  "= either parent", "chance (either)"])
    knn = sem_info["knn"]
    knn_rows = [[key, _fmt(knn["trained"][key]), _fmt(knn["untrained"][key])]
                for key in knn["trained"]]
    knn_table = plots.markdown_table(knn_rows, ["probe (features/attribute)", "trained encoder",
                                                "untrained encoder"])
    share = samples_info["compose_token_share"]
    stages_path = run_dir.path / "stages.json"
    seconds = read_json(stages_path)["seconds"] if stages_path.exists() else {}
    d, s = cfg.data, cfg.sem.dino.sem
    text = (
        f"# dlc: Discrete Latent Codes on rendered shapes\n\n"
        f"SEM encoder: **{ENCODER_TITLES[cfg.sem.encoder]}**. "
        f"{data_info['num_train']} training images ({data_info['removed_heldout']} of "
        f"{d.num_train} rendered removed: held-out pairs {', '.join(d.heldout_pairs)}); "
        f"codes of L={s.num_groups} tokens over V={s.group_size}; both DiTs "
        f"{cfg.dit.steps} steps at batch {cfg.dit.train.batch_size} from the same seed; "
        f"sampling {cfg.eval.sample_steps} Euler steps, CFG scale {cfg.eval.guidance:g} for "
        f"the DLC DiT; composition temperature {cfg.eval.compose_temperature:g}. R and B are "
        f"disjoint sets of {ev_info['num']['R']} real test images of seen combinations. "
        f"{FD_NAME} is the Frechet distance of FID computed in the attribute classifier's "
        f"128-d features: comparable within this table only, not an FID.\n\n"
        f"## Distance to real images\n\n{dist_table}\n\n{distance_sentence(dist, fd_diff)}\n\n"
        f"## Attributes\n\nAccuracy of the attribute classifier's reading against the "
        f"requested attributes; chance = the training marginal of the requested value "
        f"(kind+colour: product of the marginals).\n\n{attr_table}\n\n"
        f"Composition ({ev_info['num']['compose']} pairs of real test images differing in kind "
        f"and colour; the sampled code shares {share['parent_a']:.2f} of its tokens with parent "
        f"A's code and {share['parent_b']:.2f} with B's):\n\n{comp_table}\n\n"
        f"{attribute_sentence(attrs)}\n\n"
        f"## SEM encoder\n\n{knn_table}\n\n{knn_sentence(sem_info)}\n\n"
        f"Memorisation: {samples_info['prior_codes_in_train']:.2f} of the prior's codes and "
        f"{samples_info['text_codes_in_train']:.2f} of the text-to-code codes are exact copies "
        f"of a training image's code.\n\n"
        f"Stage times (s): " + ", ".join(f"{k} {seconds[k]}" for k in STAGES if k in seconds)
        + (f"; total {sum(seconds.values()):.0f}" if seconds else "") + "\n\n"
        + "\n".join(f"**{title}**\n\n![{p.stem}]({p.relative_to(run_dir.path)})\n"
                    for title, p in figures))
    run_dir.report_path.write_text(text)
    write_json(run_dir.path / "metrics.json", flat_metrics(ev_info, sem_info))
    return str(run_dir.report_path)


def combine_seeds(run_dirs: list[RunDir], out_dir) -> str:
    """Seed-level report of finished dlc runs that differ only in ``seed``: each set's FD over
    the seeds (mean, t interval), each pre-registered comparison FD(A) - FD(B) per seed (with
    its bootstrap interval over images) and over seeds (mean of the per-seed differences, t
    interval with n - 1 degrees of freedom: the seeds share R and the data, so the difference
    is paired within a seed), and the verdict of :func:`fd_verdict` on the seed interval.
    Writes ``report.md``, ``metrics.json`` and ``plots/`` in ``out_dir``."""
    from pathlib import Path

    from trainkit.stats import mean_ci

    if len(run_dirs) < 2:
        raise UserError("combine needs at least 2 runs (one per seed)")
    configs = [load_json(DLCExpConfig, r.config_path) for r in run_dirs]
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"the runs must have distinct seeds; got {seeds}")
    base = dataclasses.replace(configs[0], seed=0)
    for r, c in zip(run_dirs[1:], configs[1:]):
        c = dataclasses.replace(c, seed=0)
        if c != base:
            value = lambda cfg, key: functools.reduce(getattr, key.split("."), cfg)  # noqa: E731
            diff = [k for k in config_keys(base) if value(c, k) != value(base, k)]
            raise UserError(f"{r.path} differs from {run_dirs[0].path} in more than the seed: "
                            + ", ".join(diff))
    finals = []
    for r in run_dirs:
        if not r.summary_path.is_file():
            raise UserError(f"{r.path} is not finished (no summary.json)")
        final = read_json(r.summary_path)["final"]
        if "fd_difference/prior-uncond/diff" not in final:
            raise UserError(f"{r.path} predates the FD intervals: delete its checkpoints/eval "
                            "and resume it (python -m experiments run dlc --run-dir "
                            f"{r.path} --resume) to recompute the evaluation")
        finals.append(final)
    cfg = configs[0]
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    col = lambda key: np.array([f[key] for f in finals])  # noqa: E731
    metrics: dict[str, float] = {}

    def summarise(key):
        mean, half, _ = mean_ci(col(key))
        metrics[f"{key}/mean"], metrics[f"{key}/ci_half"] = float(mean), float(half)
        return float(mean), float(half)

    seed_heads = [f"seed {s}" for s in seeds]
    fd_rows, pr_rows = [], []
    for name in ("real", "uncond", "prior", "recon"):
        m, h = summarise(f"{name}/fd")
        fd_rows.append([SET_TITLES[name]] + [_fmt(v, 2) for v in col(f"{name}/fd")]
                       + [f"{m:.2f} +- {h:.2f}"])
        (pm, ph), (rm, rh) = summarise(f"{name}/precision"), summarise(f"{name}/recall")
        pr_rows.append([SET_TITLES[name], f"{pm:.3f} +- {ph:.3f}", f"{rm:.3f} +- {rh:.3f}"])
    diff_rows, verdicts = [], {}
    for a, b in FD_COMPARISONS:
        key = f"fd_difference/{a}-{b}"
        per_seed = [f"{f[key + '/diff']:+.2f} [{f[key + '/low']:+.2f}, {f[key + '/high']:+.2f}]"
                    for f in finals]
        m, h = summarise(key + "/diff")
        verdicts[f"{a}-{b}"] = v = fd_verdict(m - h, m + h)
        diff_rows.append([f"{SET_TITLES[a]} - {SET_TITLES[b]}"] + per_seed
                         + [f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]", f"**{v}**"])
    attr_rows = []
    for name in ("recon", "text"):
        for h in ("kind", "colour", "background_colour"):
            am, ah = summarise(f"{name}/acc/{h}")
            cm, _ = summarise(f"{name}/chance/{h}")
            attr_rows.append([SET_TITLES[name], h, f"{am:.3f} +- {ah:.3f}", f"{cm:.3f}"])
    for h in ("kind", "colour", "background_colour"):
        am, ah = summarise(f"compose/{h}/either")
        cm, _ = summarise(f"compose/{h}/chance_either")
        attr_rows.append([SET_TITLES["compose"] + " (either parent)", h, f"{am:.3f} +- {ah:.3f}",
                          f"{cm:.3f}"])
    names = ("real", "uncond", "prior", "recon")
    plot = plots.bar_chart(out / "plots" / "fd_by_set.png", [SET_TITLES[n] for n in names],
                           [metrics[f"{n}/fd/mean"] for n in names],
                           errors=[metrics[f"{n}/fd/ci_half"] for n in names],
                           ylabel=f"{FD_NAME} to R", title=f"dlc: {len(seeds)} seeds "
                           "(mean, 95% t interval)")
    d = verdicts["prior-uncond"]
    m = metrics["fd_difference/prior-uncond/diff/mean"]
    h = metrics["fd_difference/prior-uncond/diff/ci_half"]
    text = (
        f"# dlc: {len(seeds)} seeds combined\n\n"
        "Runs: " + ", ".join(f"`{r.path}` (seed {s})" for r, s in zip(run_dirs, seeds)) + ". "
        "Identical configuration apart from the model seed (same data and the same R; the "
        "seed also sets the attribute CNN's initialisation, so each seed measures FD in its own "
        "feature space: compare sets within a seed, which is what the differences do). "
        f"SEM encoder {cfg.sem.encoder}, DiTs {cfg.dit.steps} steps, {cfg.eval.num_samples} "
        f"images per set, {cfg.eval.sample_steps} Euler steps, CFG {cfg.eval.guidance:g}. "
        f"Intervals over seeds: Student t, 95%, n - 1 = {len(seeds) - 1} degrees of freedom "
        f"(`trainkit.stats.mean_ci`). {FD_NAME}: comparable within this table only.\n\n"
        f"**The paper's claim (codes sampled from the prior give images closer to real ones "
        f"than the unconditional DiT's, at equal compute):** prior-code samples are **{d}** "
        f"(FD difference {m:+.2f} [{m - h:+.2f}, {m + h:+.2f}] over seeds).\n\n"
        "## FD to R by seed\n\n"
        + plots.markdown_table(fd_rows, ["set (against R)"] + seed_heads + ["mean +- 95%"])
        + "\n\n## Comparisons (negative: A is closer to R)\n\nPer seed: the difference with its "
        f"basic bootstrap 95% interval over images ({cfg.eval.fd_resamples} resamples of R, A "
        "and B). Over seeds: mean of the per-seed differences with its t interval; the verdict "
        "reads only that interval.\n\n"
        + plots.markdown_table(diff_rows, ["A - B"] + seed_heads + ["over seeds", "A is"])
        + "\n\n## Precision and recall (k-NN manifolds, mean +- 95% over seeds)\n\n"
        + plots.markdown_table(pr_rows, ["set", "precision", "recall"])
        + "\n\n## Attributes read back (mean +- 95% over seeds; chance = training marginal)\n\n"
        + plots.markdown_table(attr_rows, ["set", "attribute", "accuracy", "chance"])
        + f"\n\n![fd_by_set]({plot.relative_to(out)})\n")
    (out / "report.md").write_text(text)
    write_json(out / "metrics.json", {"seeds": seeds, "runs": [str(r.path) for r in run_dirs],
                                      "verdicts": verdicts, "metrics": metrics})
    return str(out / "report.md")


def _smooth(x: np.ndarray, w: int = 25) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if len(x) < w:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    out[w - 1:] = (c[w:] - c[:-w]) / w
    out[:w - 1] = c[1:w] / np.arange(1, w)
    return out


EXPERIMENT = Experiment(
    name="dlc",
    description="Discrete Latent Codes: SEM tokens from a self-distilled ViT condition a pixel "
                "DiT; MDLM code prior, composition and text-to-code (arXiv 2507.12318)",
    config_cls=DLCExpConfig,
    presets={"smoke": smoke, "cpu": cpu, "control": control, "paper": paper},
    run=run,
    report=report,
    combine=combine_seeds,
)
