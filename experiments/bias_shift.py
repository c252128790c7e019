"""bias_shift: bias shift of unconditional generators on rendered shapes, measured by attribute
classifiers and by the renderer's ground truth.

"Bias Analysis in Unconditional Image Generative Models" (arXiv 2506.09106) measures the shift
of attribute rates from training data to generations, ``ABS(a) = |P_gen(a) - P_val(a)|``, with
one attribute classifier labelling both sets, and finds (1) small shifts (about 1% for binary
attributes, 3-5% for "spectrum" attributes; diffusion shifts less than a GAN, larger models
less; FID does not track it) and (2) a strong dependence on the classifier where its decision
boundary lies in a dense region of the data. The paper has no ground truth for generated faces;
here the renderer of :mod:`generative.datasets` knows every training image's attributes, and a
renderer-parameter regressor (:mod:`generative.attribute_models`) reads them back from
generated images, so the classifier-measured shift can be set against the true one.

Pipeline (stages, each saved under ``<run>/checkpoints/<stage>/``; ``--resume`` reloads
finished stages):

1. ``data``: generator training renders (``data.num_train``) and a held-out validation set
   (``data.num_val``) of the *skewed* distribution (``data.skew``: rejection sampling of the
   renderer's attributes so that, e.g., 30% of shapes are circles instead of 20%; the data
   then carry a bias against the ideal reference ``attributes.ideal``); renders of the
   *ideal* (unskewed) distribution for the attribute readers (``data.num_reader``); and the
   control "renderer+": validation-distribution renders with sizes scaled by
   ``eval.perturb_size`` and hues moved by ``eval.perturb_hue``, a generator whose true
   shift is known exactly.
2. ``readers``: binary attribute classifiers of two architectures (the evaluation CNN of
   :mod:`generative.evaluation` at reduced width, and a pixel MLP), ``readers.seeds`` seeds
   each, one head per attribute; and the parameter regressor (kind, background, hue, size).
3. ``generators``: unconditional DiTs of two sizes (:mod:`generative.dit`, rectified flow) and a
   VAE (:mod:`generative.vae`); ``generators.num_samples`` samples each.
4. ``eval``: per attribute and generator, the true shift (regressor on samples and on the
   validation set; exact for renderer+) and the shift measured by each classifier, with
   bootstrap CIs (:mod:`generative.bias`), verdicts (invents / hides / ...), boundary density
   (classifier logit mass within ``eval.logit_margin`` of the threshold, and the density of the
   true value at the attribute's boundary), threshold sweeps, spread over classifiers, and a
   Frechet distance in the regressor's features per generator.

Attributes (:func:`generative.bias.shape_attributes`): binary ``circle`` (shape kind),
``striped`` (background texture); spectrum ``large`` (size), ``warm`` (hue band), ``bright``
(mean luminance of the image, computed from the pixels: exact for generated images too).

Run: ``python -m experiments run bias_shift --preset cpu``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.registry import Experiment, RunContext, RunResult, UserError
from generative import attribute_models as am
from generative import bias as B
from generative import datasets
from generative import dit
from generative import evaluation as ev
from generative import vae as vae_lib
from trainkit import plots
from trainkit.config import Config, ConfigError, field, load_json
from trainkit.run import RunDir, is_main_process, read_json, write_json
from trainkit.sharding import make_mesh

STAGES = ("data", "readers", "generators", "eval")
GENERATORS = ("dit_small", "dit_large", "vae")
GEN_TITLES = {"dit_small": "DiT small", "dit_large": "DiT large", "vae": "VAE",
              "renderer+": "renderer+ (control, exact truth)"}
ARCHS = ("cnn", "mlp")
FD_NAME = "FD (regressor features)"


def _parse_rates(items, what: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            p = float(value)
        except ValueError:
            raise ValueError(f"{what}: entry {item!r} must be 'attribute:rate'") from None
        if not 0.0 < p < 1.0:
            raise ValueError(f"{what}: rate of {name!r} = {p} must be in (0, 1)")
        out[name] = p
    return out


# --- config -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    seed: int = field(0, ge=0, help="shapes data seed (renders come from default_rng([seed, "
                                    "split, index]))")
    num_train: int = field(4000, ge=8, help="generator training renders (skewed distribution)")
    num_val: int = field(1000, ge=8, help="held-out validation renders (skewed distribution)")
    num_reader: int = field(2500, ge=8, help="renders of the ideal distribution the classifiers "
                                             "and the regressor train on")
    skew: tuple[str, ...] = field(("circle:0.3", "large:0.4"),
                                  help="'attribute:rate' targets of the training distribution "
                                       "(rejection sampling of renderer parameters; circle, "
                                       "striped, large, warm)")


@dataclasses.dataclass(frozen=True)
class AttributesConfig(Config):
    kind: str = field("circle", choices=datasets.SHAPE_KINDS, help="binary: shape kind")
    background: str = field("stripes", choices=datasets.BACKGROUND_KINDS,
                            help="binary: background texture (attribute 'striped')")
    size_threshold: float = field(0.21, gt=datasets.SIZE_RANGE[0], lt=datasets.SIZE_RANGE[1],
                                  help="spectrum 'large': size >= threshold")
    hue_band: tuple[float, float] = field((0.0, 0.5), help="spectrum 'warm': hue in [lo, hi)")
    brightness_threshold: float = field(0.33, gt=0, lt=1,
                                        help="spectrum 'bright': mean luminance >= threshold "
                                             "(about the median of renders)")
    ideal: tuple[str, ...] = field(("circle:0.2", "striped:0.2", "large:0.5", "warm:0.5",
                                    "bright:0.5"),
                                   help="'attribute:rate' of the ideal reference distribution "
                                        "(bias = P - P_ideal)")

    def validate(self) -> None:
        lo, hi = self.hue_band
        if not 0.0 <= lo < hi <= 1.0:
            raise self.invalid("hue_band", "0 <= lo < hi <= 1")
        try:
            rates = _parse_rates(self.ideal, "ideal")
        except ValueError as err:
            raise self.invalid("ideal", str(err)) from None
        names = set(self.specs())
        if set(rates) != names:
            raise self.invalid("ideal", f"one rate for each of {sorted(names)}")

    def specs(self) -> dict[str, B.ShapeAttribute]:
        return B.shape_attributes(self.kind, self.background, self.size_threshold,
                                  tuple(self.hue_band), self.brightness_threshold)


@dataclasses.dataclass(frozen=True)
class ReadersConfig(Config):
    seeds: int = field(3, ge=1, help="classifier seeds per architecture")
    archs: tuple[str, ...] = field(ARCHS, help="classifier architectures (cnn, mlp)")
    cnn_widths: tuple[int, ...] = field((8, 16, 32), help="AttributeCNN stage widths")
    mlp_hidden: tuple[int, ...] = field((256, 128), help="PixelMLP hidden widths")
    steps: int = field(200, ge=1, help="training steps of each classifier")
    batch_size: int = field(32, ge=2)
    learning_rate: float = field(2e-3, gt=0)
    regressor_steps: int = field(500, ge=1, help="parameter-regressor training steps")
    regressor_widths: tuple[int, ...] = field((16, 32, 64), help="regressor CNN widths")

    def validate(self) -> None:
        if not self.archs or set(self.archs) - set(ARCHS):
            raise self.invalid("archs", f"a non-empty subset of {ARCHS}")


@dataclasses.dataclass(frozen=True)
class GeneratorsConfig(Config):
    dit_small: dit.DiTConfig = field(
        factory=lambda: dit.DiTConfig(patch_size=4, dim=48, depth=2, heads=4, mlp_ratio=2,
                                      time_features=64, code_length=1, vocab_size=2,
                                      unconditional=True), help="the smaller DiT")
    dit_large: dit.DiTConfig = field(
        factory=lambda: dit.DiTConfig(patch_size=4, dim=96, depth=3, heads=4, mlp_ratio=2,
                                      time_features=64, code_length=1, vocab_size=2,
                                      unconditional=True), help="the larger DiT")
    dit_train: dit.DiTTrainConfig = field(
        factory=lambda: dit.DiTTrainConfig(learning_rate=2e-3, warmup_steps=50, batch_size=32,
                                           ema_decay=0.995))
    dit_steps: int = field(300, ge=1, help="training steps of each DiT")
    vae: vae_lib.VAEConfig = field(factory=lambda: vae_lib.VAEConfig(widths=(16, 32),
                                                                     latent_dim=32))
    vae_train: vae_lib.VAETrainConfig = field(factory=lambda: vae_lib.VAETrainConfig(
        learning_rate=2e-3, batch_size=32))
    vae_steps: int = field(300, ge=1, help="VAE training steps")
    num_samples: int = field(800, ge=8, help="samples of each generator")
    sample_steps: int = field(20, ge=1, help="Euler steps of DiT sampling")
    sample_batch: int = field(200, ge=1, help="images per DiT sampling call")

    def validate(self) -> None:
        for name in ("dit_small", "dit_large"):
            if not getattr(self, name).unconditional:
                raise ConfigError(f"{name}.unconditional", False, "must be true (unconditional "
                                                                  "generators)")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    bootstrap: int = field(1000, ge=10, help="bootstrap resamples of every CI")
    confidence: float = field(0.95, gt=0, lt=1, help="CI level")
    logit_margin: float = field(1.0, gt=0, help="boundary mass: |log-odds| < margin")
    value_margin: float = field(0.05, gt=0, lt=0.5,
                                help="true-value boundary density: |v - boundary| < margin x "
                                     "(5-95% range of v on the validation set)")
    thresholds: tuple[float, ...] = field((0.2, 0.35, 0.5, 0.65, 0.8),
                                          help="probability thresholds of the sweep")
    perturb_size: float = field(1.04, gt=0.5, lt=1.5, help="renderer+ control: size factor")
    perturb_hue: float = field(0.02, ge=-0.5, le=0.5, help="renderer+ control: hue offset")
    grid_images: int = field(32, ge=1)


@dataclasses.dataclass(frozen=True)
class BiasShiftConfig(Config):
    seed: int = field(0, ge=0, help="model initialisation, batches and sampling")
    data: DataConfig = field(factory=DataConfig)
    attributes: AttributesConfig = field(factory=AttributesConfig)
    readers: ReadersConfig = field(factory=ReadersConfig)
    generators: GeneratorsConfig = field(factory=GeneratorsConfig)
    eval: EvalConfig = field(factory=EvalConfig)

    def validate(self) -> None:
        names = set(self.attributes.specs())
        try:
            skew = _parse_rates(self.data.skew, "data.skew")
        except ValueError as err:
            raise ConfigError("data.skew", self.data.skew, str(err)) from None
        bad = set(skew) - (names - {"bright"})
        if bad:
            raise ConfigError("data.skew", self.data.skew,
                              f"attributes {sorted(bad)} cannot be skewed; choose from "
                              f"{sorted(names - {'bright'})}")


def smoke() -> BiasShiftConfig:
    """Tiny sets, tiny models, 2-3 steps each (tests). Its cost is compilation of ~15
    programs (2 classifiers, the regressor, 2 DiTs + samplers, the VAE): 80 s of CPU time,
    176 s wall on the 2-core machine at load average 10."""
    tiny_dit = dit.DiTConfig(patch_size=8, dim=16, depth=1, heads=2, mlp_ratio=1,
                             time_features=8, code_length=1, vocab_size=2, unconditional=True)
    return BiasShiftConfig(
        data=DataConfig(num_train=48, num_val=40, num_reader=48),
        readers=ReadersConfig(seeds=1, cnn_widths=(4, 8), mlp_hidden=(16,), steps=3,
                              batch_size=16, regressor_steps=3, regressor_widths=(4, 8)),
        generators=GeneratorsConfig(
            dit_small=tiny_dit, dit_large=dataclasses.replace(tiny_dit, dim=32),
            dit_train=dit.DiTTrainConfig(learning_rate=1e-3, batch_size=8, ema_decay=0.9),
            dit_steps=2, vae=vae_lib.VAEConfig(widths=(4,), latent_dim=4),
            vae_train=vae_lib.VAETrainConfig(batch_size=8), vae_steps=2,
            num_samples=40, sample_steps=2, sample_batch=40),
        eval=EvalConfig(bootstrap=50, grid_images=8))


def cpu() -> BiasShiftConfig:
    """Laptop scale (the defaults): 4000 skewed training renders, 1000 validation renders,
    2500 ideal renders for the readers; 2 architectures x 3 seeds of classifiers (CNN of
    widths 8/16/32 and a 256-128 pixel MLP, 200 steps at batch 32), a parameter regressor
    (CNN 16/32/64, 500 steps); DiTs of 2 blocks x 48 and 3 blocks x 96 (300 steps at batch 32,
    lr 2e-3) and a VAE (300 steps); 800 samples each. Sized for about 25 min on this 2-core
    machine shared with other jobs (load average 10-13 while it ran)."""
    return BiasShiftConfig()


def paper() -> BiasShiftConfig:
    """Larger, for accelerators (not run here): the paper's protocol at the scale its
    generators were trained (tens of thousands of training images and samples, several
    classifier seeds per architecture, DiTs of DiT-S and DiT-B width)."""
    return BiasShiftConfig(
        data=DataConfig(num_train=100_000, num_val=20_000, num_reader=50_000),
        readers=ReadersConfig(seeds=5, cnn_widths=(32, 64, 128), mlp_hidden=(1024, 512),
                              steps=5000, batch_size=256, regressor_steps=20_000,
                              regressor_widths=(64, 128, 256)),
        generators=GeneratorsConfig(
            dit_small=dit.DiTConfig(patch_size=2, dim=384, depth=12, heads=6, code_length=1,
                                    vocab_size=2, unconditional=True),
            dit_large=dit.DiTConfig(patch_size=2, dim=768, depth=12, heads=12, code_length=1,
                                    vocab_size=2, unconditional=True),
            dit_train=dit.DiTTrainConfig(learning_rate=1e-4, batch_size=256, ema_decay=0.9999),
            dit_steps=200_000, vae=vae_lib.VAEConfig(widths=(64, 128, 256), latent_dim=128),
            vae_train=vae_lib.VAETrainConfig(learning_rate=5e-4, batch_size=256),
            vae_steps=100_000, num_samples=20_000, sample_steps=100, sample_batch=1000),
        eval=EvalConfig(bootstrap=2000))


# --- data -------------------------------------------------------------------------------------

SPLIT_SEED = {"train": 0, "val": 1, "reader": 2, "control": 3}


def base_rates(specs: dict[str, B.ShapeAttribute], num: int = 20_000) -> dict[str, float]:
    """Rates of the renderer-parameter attributes under the renderer's own distribution
    (from ``num`` parameter draws, no rendering)."""
    rng = np.random.default_rng(12345)
    draws = [datasets.sample_shape_attributes(rng) for _ in range(num)]
    values = {k: np.array([d[k] for d in draws], np.float64)
              for k in ("kind", "background", "hue", "size")}
    return {n: float(a.label(values[a.value]).mean()) for n, a in specs.items()
            if a.value != "brightness"}


def acceptance(params: dict[str, Any], specs: dict[str, B.ShapeAttribute],
               targets: dict[str, float], base: dict[str, float]) -> float:
    """Rejection-sampling acceptance of one parameter draw: ``prod_a w_a(x) / max w``, with
    ``w_a = t_a / b_a`` if ``a(x)`` else ``(1 - t_a) / (1 - b_a)``. The renderer draws its
    parameters independently, so each skewed attribute reaches its target rate ``t_a`` and the
    others keep theirs."""
    w, w_max = 1.0, 1.0
    for name, t in targets.items():
        a, b = specs[name], base[name]
        on = bool(a.label([params[a.value]])[0])
        w *= t / b if on else (1 - t) / (1 - b)
        w_max *= max(t / b, (1 - t) / (1 - b))
    return w / w_max


def render_set(seed: int, split: str, num: int, specs, targets: dict[str, float],
               base: dict[str, float], size_factor: float = 1.0, hue_offset: float = 0.0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``num`` renders (uint8) and their parameters, drawn with
    :func:`generative.datasets.sample_shape_attributes` from ``default_rng([seed, split, i])``
    (i = 0, 1, ...) and kept with :func:`acceptance` (a separate stream decides); optionally
    with sizes scaled and hues offset (the renderer+ control)."""
    images, params = [], []
    i = 0
    s = SPLIT_SEED[split]
    while len(images) < num:
        p = datasets.sample_shape_attributes(np.random.default_rng([seed, 100 + s, i]))
        u = np.random.default_rng([seed, 200 + s, i]).uniform()
        i += 1
        if targets and u >= acceptance(p, specs, targets, base):
            continue
        if size_factor != 1.0 or hue_offset != 0.0:
            p = dict(p, size=float(np.float32(p["size"] * size_factor)),
                     hue=float(np.float32((p["hue"] + hue_offset) % 1.0)))
        images.append(datasets.render_shape(p))
        params.append(p)
    raw = {k: np.array([p[k] for p in params]) for k in datasets.SHAPE_FIELDS}
    return np.stack(images), raw


def stage_data(cfg: BiasShiftConfig):
    d, e = cfg.data, cfg.eval
    specs = cfg.attributes.specs()
    skew = _parse_rates(d.skew, "data.skew")
    base = base_rates(specs)
    arrays = {}
    for split, num, targets, kw in (
            ("train", d.num_train, skew, {}), ("val", d.num_val, skew, {}),
            ("reader", d.num_reader, {}, {}),
            ("control", cfg.generators.num_samples, skew,
             {"size_factor": e.perturb_size, "hue_offset": e.perturb_hue})):
        images, raw = render_set(d.seed, split, num, specs, targets, base, **kw)
        arrays[f"{split}_images"] = images
        arrays.update({f"{split}_{k}": v for k, v in raw.items()})
    return arrays, None, {"base_rates": base, "skew": skew}


def raw_of(data: dict, split: str) -> dict[str, np.ndarray]:
    return {k: data[f"{split}_{k}"] for k in datasets.SHAPE_FIELDS}


def exact_labels(cfg: BiasShiftConfig, data: dict, split: str) -> dict[str, np.ndarray]:
    specs = cfg.attributes.specs()
    values = B.attribute_values(raw_of(data, split), data[f"{split}_images"])
    return B.attribute_labels(specs, values)


# --- stage storage ------------------------------------------------------------------------------


def Stages(run_dir: RunDir, resume: bool):
    """This experiment's stage store, ``<run>/checkpoints/<stage>/``
    (:class:`trainkit.checkpoint.StageStore`)."""
    from trainkit.checkpoint import StageStore

    return StageStore(run_dir.checkpoints_dir, resume, "bias_shift")


def _pure(model: nnx.Module) -> Any:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _restore(make: Callable[[nnx.Rngs], nnx.Module], pure: Any) -> nnx.Module:
    graphdef, params = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))), nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, params)


# --- readers ------------------------------------------------------------------------------------


def classifier_names(cfg: BiasShiftConfig) -> list[str]:
    return [f"{a}{s}" for a in cfg.readers.archs for s in range(cfg.readers.seeds)]


def build_reader(cfg: BiasShiftConfig, arch: str) -> Callable:
    r, heads = cfg.readers, {n: 2 for n in cfg.attributes.specs()}
    if arch == "cnn":
        return lambda rngs: ev.AttributeCNN(heads, widths=r.cnn_widths, rngs=rngs)
    return lambda rngs: am.PixelMLP(heads, hidden=r.mlp_hidden, rngs=rngs)


def build_regressor(cfg: BiasShiftConfig) -> Callable:
    return lambda rngs: ev.AttributeCNN(am.REGRESSOR_HEADS, widths=cfg.readers.regressor_widths,
                                        rngs=rngs)


def stage_readers(cfg: BiasShiftConfig, data: dict, mesh=None):
    r = cfg.readers
    images = data["reader_images"]
    labels = exact_labels(cfg, data, "reader")
    heads = {n: 2 for n in labels}
    params, info = {}, {"val_accuracy": {}}
    val_labels = exact_labels(cfg, data, "val")
    for arch in r.archs:
        for s in range(r.seeds):
            name = f"{arch}{s}"
            key = jax.random.key(cfg.seed * 1000 + 100 * ARCHS.index(arch) + s + 1)
            kw = ({"widths": r.cnn_widths} if arch == "cnn"
                  else {"build": am.build_mlp(r.mlp_hidden)})
            clf = ev.train_attribute_classifier(images, labels, key, num_classes=heads,
                                                steps=r.steps, batch_size=r.batch_size,
                                                learning_rate=r.learning_rate, mesh=mesh, **kw)
            params[name] = _pure(clf.model)
            info["val_accuracy"][name] = ev.attribute_accuracy(clf, data["val_images"],
                                                               val_labels)
    reg = am.train_regressor(images, raw_of(data, "reader"), jax.random.key(cfg.seed + 7),
                             steps=r.regressor_steps, batch_size=r.batch_size,
                             widths=r.regressor_widths, mesh=mesh)
    params["regressor"] = _pure(reg.classifier.model)
    info["regressor"] = {"size_mean": reg.size_mean, "size_std": reg.size_std,
                         "val_errors": am.regressor_errors(reg.predict(data["val_images"]),
                                                           raw_of(data, "val"))}
    return None, params, info


def load_readers(cfg: BiasShiftConfig, params: dict, info: dict):
    heads = {n: 2 for n in cfg.attributes.specs()}
    clfs = {name: ev.AttributeClassifier(_restore(build_reader(cfg, name.rstrip("0123456789")),
                                                  params[name]), dict(heads))
            for name in classifier_names(cfg)}
    reg = am.Regressor(ev.AttributeClassifier(_restore(build_regressor(cfg), params["regressor"]),
                                              dict(am.REGRESSOR_HEADS)),
                       info["regressor"]["size_mean"], info["regressor"]["size_std"])
    return clfs, reg


# --- generators ---------------------------------------------------------------------------------


def _float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(127.5) - 1.0


def dit_samples(model: dit.DiT, key: jax.Array, g: GeneratorsConfig) -> np.ndarray:
    out = []
    for i, start in enumerate(range(0, g.num_samples, g.sample_batch)):
        x = dit.sample(model, jax.random.fold_in(key, i), None, steps=g.sample_steps,
                       num_samples=g.sample_batch)
        out.append(ev.to_uint8(np.asarray(x)))
    return np.concatenate(out)[:g.num_samples]


def stage_generators(cfg: BiasShiftConfig, data: dict, mesh=None):
    g = cfg.generators
    x = _float(data["train_images"])
    key = jax.random.key(cfg.seed + 3)
    arrays, params, info = {}, {}, {}
    for i, name in enumerate(("dit_small", "dit_large")):
        mcfg = getattr(g, name)
        t0 = time.time()
        trained = dit.train_dit(mcfg, x, None, jax.random.fold_in(key, i), g.dit_steps,
                                train=g.dit_train, mesh=mesh)
        model = trained.ema_model if trained.ema_model is not None else trained.model
        t1 = time.time()
        arrays[f"{name}_images"] = dit_samples(model, jax.random.fold_in(key, 10 + i), g)
        arrays[f"{name}_losses"] = trained.losses
        params[name] = _pure(model)
        n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params[name]))
        info[name] = {"params": n_params, "train_seconds": round(t1 - t0, 1),
                      "sample_seconds": round(time.time() - t1, 1),
                      "loss_last": float(np.mean(trained.losses[-50:]))}
    t0 = time.time()
    model, hist = vae_lib.train_vae(g.vae, x, jax.random.fold_in(key, 2), g.vae_steps,
                                    train=g.vae_train, mesh=mesh)
    t1 = time.time()
    arrays["vae_images"] = ev.to_uint8(np.asarray(
        vae_lib.sample(model, jax.random.fold_in(key, 12), g.num_samples)))
    arrays["vae_losses"] = hist["loss"]
    params["vae"] = _pure(model)
    info["vae"] = {"params": sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params["vae"])),
                   "train_seconds": round(t1 - t0, 1), "sample_seconds": round(time.time() - t1, 1),
                   "loss_last": float(np.mean(hist["loss"][-50:])),
                   "rec_last": float(np.mean(hist["rec"][-50:]))}
    return arrays, params, info


# --- evaluation ---------------------------------------------------------------------------------


def _ci_dict(ci: B.ShiftCI) -> dict[str, float]:
    return {k: float(v) for k, v in ci._asdict().items()}


def stage_eval(cfg: BiasShiftConfig, data: dict, gens: dict, clfs: dict, reg: am.Regressor):
    e = cfg.eval
    specs = cfg.attributes.specs()
    names = list(specs)
    ideal = _parse_rates(cfg.attributes.ideal, "ideal")
    boot = jax.jit(B.bootstrap_shift, static_argnames=("num_resamples", "confidence"))
    disc = jax.jit(B.bootstrap_discrepancy, static_argnames=("num_resamples", "confidence"))
    key = jax.random.key(cfg.seed + 9)
    sets = {"val": data["val_images"], "renderer+": data["control_images"]}
    sets.update({g: gens[f"{g}_images"] for g in GENERATORS})
    shifted = ["renderer+", *GENERATORS]
    # true labels: regressor on every set (brightness from pixels); exact where recorded
    reg_values, reg_labels, logits, feats = {}, {}, {}, {}
    for s, imgs in sets.items():
        pred = reg.predict(imgs)
        reg_values[s] = B.attribute_values(pred, imgs)
        reg_labels[s] = B.attribute_labels(specs, reg_values[s])
        feats[s] = reg.features(imgs)
        logits[s] = {c: {a: np.asarray(B.binary_logit(jnp.asarray(v)))
                         for a, v in clf.logits(imgs).items()} for c, clf in clfs.items()}
    exact = {"val": exact_labels(cfg, data, "val"), "renderer+": exact_labels(cfg, data, "control"),
             "train": exact_labels(cfg, data, "train")}
    exact_values = {"val": B.attribute_values(raw_of(data, "val"), data["val_images"])}
    cnames = list(clfs)
    res: dict[str, Any] = {"attributes": {}, "classifiers": cnames, "generators": shifted}
    kb = 0
    for a in names:
        spec = specs[a]
        ra = {"spectrum": spec.spectrum, "words": spec.words, "ideal": ideal[a],
              "rate": {"train": float(exact["train"][a].mean()),
                       "val": float(exact["val"][a].mean())},
              "regressor_label_accuracy_val": float(np.mean(reg_labels["val"][a]
                                                            == exact["val"][a])),
              "regressor_rate_error_val": float(reg_labels["val"][a].mean()
                                                - exact["val"][a].mean()),
              "classifier_rate_error_val": {c: float(np.mean(logits["val"][c][a] > 0)
                                                     - exact["val"][a].mean())
                                            for c in cnames},
              "boundary": {}, "sets": {}}
        # density of the true value at the boundary (validation set); 0 for discrete values
        if spec.spectrum:
            v = exact_values["val"][spec.value]
            width = float(np.percentile(v, 95) - np.percentile(v, 5))
            dist = np.asarray(B.distance_to_boundaries(jnp.asarray(v), jnp.asarray(
                spec.boundaries()), spec.period))
            ra["value_density"] = float(np.mean(dist < e.value_margin * width))
        else:
            ra["value_density"] = 0.0
        ra["boundary"]["val"] = {c: float(B.boundary_mass(jnp.asarray(logits["val"][c][a]), 0.0,
                                                          e.logit_margin)) for c in cnames}
        for g in shifted:
            kb += 1
            k = jax.random.fold_in(key, kb)
            true_ci = boot(k, jnp.asarray(reg_labels[g][a]), jnp.asarray(reg_labels["val"][a]),
                           num_resamples=e.bootstrap, confidence=e.confidence)
            entry = {"true": _ci_dict(true_ci), "measured": {}, "verdict": {},
                     "rate_true": float(reg_labels[g][a].mean()),
                     "boundary": {c: float(B.boundary_mass(jnp.asarray(logits[g][c][a]), 0.0,
                                                           e.logit_margin)) for c in cnames}}
            if g == "renderer+":
                exact_ci = boot(k, jnp.asarray(exact[g][a]), jnp.asarray(exact["val"][a]),
                                num_resamples=e.bootstrap, confidence=e.confidence)
                entry["exact"] = _ci_dict(exact_ci)
                entry["rate_exact"] = float(exact[g][a].mean())
            ref = entry.get("exact", entry["true"])
            for j, c in enumerate(cnames):
                m = boot(jax.random.fold_in(k, j + 1), jnp.asarray(logits[g][c][a] > 0),
                         jnp.asarray(logits["val"][c][a] > 0), num_resamples=e.bootstrap,
                         confidence=e.confidence)
                entry["measured"][c] = _ci_dict(m)
                entry["verdict"][c] = B.shift_verdict(ref["low"], ref["high"], float(m.low),
                                                      float(m.high), ref["shift"], float(m.shift))
            ms = jnp.asarray([entry["measured"][c]["shift"] for c in cnames])
            entry["sensitivity"] = {k_: float(v) for k_, v in B.sensitivity(ms).items()}
            for arch in cfg.readers.archs:
                sub = jnp.asarray([entry["measured"][c]["shift"] for c in cnames
                                   if c.startswith(arch)])
                entry["sensitivity"][f"std_{arch}"] = float(B.sensitivity(sub)["std"])
            entry["discrepancy"] = {c: float(B.discrepancy(entry["measured"][c]["shift"],
                                                           ref["shift"])) for c in cnames}
            # paired CI of measured - true on the same images (shared sampling noise cancels)
            tg, tr = ((exact[g][a], exact["val"][a]) if g == "renderer+"
                      else (reg_labels[g][a], reg_labels["val"][a]))
            entry["discrepancy_ci"] = {c: _ci_dict(disc(
                jax.random.fold_in(k, 100 + j), jnp.asarray(logits[g][c][a] > 0), jnp.asarray(tg),
                jnp.asarray(logits["val"][c][a] > 0), jnp.asarray(tr),
                num_resamples=e.bootstrap, confidence=e.confidence))
                for j, c in enumerate(cnames)}
            qs = jnp.asarray(e.thresholds)
            thr = jnp.log(qs) - jnp.log1p(-qs)
            entry["sweep"] = {c: np.asarray(B.threshold_sweep(
                jnp.asarray(logits[g][c][a]), jnp.asarray(logits["val"][c][a]), thr)).tolist()
                for c in cnames}
            entry["bias"] = {"true": float(reg_labels[g][a].mean() - ideal[a])}
            ra["sets"][g] = entry
        ra["bias"] = {"train": float(exact["train"][a].mean() - ideal[a]),
                      "val": float(exact["val"][a].mean() - ideal[a])}
        res["attributes"][a] = ra
    # FD in the regressor's feature space, with a real-vs-real floor (train renders vs val)
    n = len(sets["val"])
    floor_feats = reg.features(data["train_images"][:n])
    res["fd"] = {"real floor": ev.feature_frechet_distance(feats["val"], floor_feats),
                 **{g: ev.feature_frechet_distance(feats["val"], feats[g]) for g in shifted}}
    res["correlation"] = discrepancy_correlations(res, cnames, shifted)
    res["findings"] = findings(res, cnames)
    arrays = {f"logit/{s}/{c}/{a}": logits[s][c][a] for s in sets for c in cnames for a in names}
    arrays.update({f"value/{s}/{v}": reg_values[s][v] for s in sets for v in reg_values[s]})
    arrays.update({f"exact/val/{v}": exact_values["val"][v] for v in exact_values["val"]})
    return arrays, None, res


def discrepancy_rows(res: dict, cnames: list[str], gens: list[str]) -> list[dict]:
    """One row per (attribute, generator): mean |measured - true| over classifiers, the mean
    classifier boundary mass (validation and generated sets), the true-value density, the
    spread over classifiers."""
    rows = []
    for a, ra in res["attributes"].items():
        for g in gens:
            en = ra["sets"][g]
            rows.append({"attribute": a, "generator": g, "spectrum": ra["spectrum"],
                         "abs_discrepancy": float(np.mean([abs(en["discrepancy"][c])
                                                           for c in cnames])),
                         "boundary_mass": float(np.mean([ra["boundary"]["val"][c]
                                                         + en["boundary"][c] for c in cnames]) / 2),
                         "value_density": ra["value_density"],
                         "spread": en["sensitivity"]["std"]})
    return rows


def discrepancy_correlations(res: dict, cnames: list[str], gens: list[str]) -> dict:
    rows = discrepancy_rows(res, cnames, gens)
    d = np.array([r["abs_discrepancy"] for r in rows])
    s = np.array([r["spread"] for r in rows])
    out = {"num_points": len(rows)}
    for key in ("boundary_mass", "value_density"):
        x = np.array([r[key] for r in rows])
        out[key] = {"pearson_abs_discrepancy": _safe(B.pearson, x, d),
                    "spearman_abs_discrepancy": _safe(B.spearman, x, d),
                    "pearson_spread": _safe(B.pearson, x, s),
                    "spearman_spread": _safe(B.spearman, x, s)}
    return out


def _safe(fn, x, y) -> float | None:
    try:
        v = fn(x, y)
    except ValueError:
        return None
    return None if not math.isfinite(v) else v


def findings(res: dict, cnames: list[str]) -> dict:
    """The numbers behind the paper's two findings (see the report)."""
    attrs = res["attributes"]
    out: dict[str, Any] = {"abs_true": {}, "abs_measured": {}}
    for g in GENERATORS:
        out["abs_true"][g] = {a: abs(attrs[a]["sets"][g]["true"]["shift"]) for a in attrs}
        out["abs_measured"][g] = {a: float(np.mean([abs(attrs[a]["sets"][g]["measured"][c]["shift"])
                                                    for c in cnames])) for a in attrs}
    kinds = {"binary": [a for a in attrs if not attrs[a]["spectrum"]],
             "spectrum": [a for a in attrs if attrs[a]["spectrum"]]}
    out["mean_abs"] = {
        g: {f"{which}_{kind}": float(np.mean([out[f"abs_{which}"][g][a] for a in names]))
            for which in ("true", "measured") for kind, names in kinds.items()}
        for g in GENERATORS}
    out["mean_abs_true_all"] = {g: float(np.mean(list(out["abs_true"][g].values())))
                                for g in GENERATORS}
    out["spread"] = {kind: float(np.mean([attrs[a]["sets"][g]["sensitivity"]["std"]
                                          for a in names for g in GENERATORS]))
                     for kind, names in kinds.items()}
    out["fd_vs_abs_spearman"] = _safe(B.spearman, [res["fd"][g] for g in GENERATORS],
                                      [out["mean_abs_true_all"][g] for g in GENERATORS])
    verdicts: dict[str, int] = {}
    for a in attrs:
        for g in res["generators"]:
            for c in cnames:
                v = attrs[a]["sets"][g]["verdict"][c]
                verdicts[v] = verdicts.get(v, 0) + 1
    out["verdict_counts"] = verdicts
    return out


# --- run ----------------------------------------------------------------------------------------


def run(cfg: BiasShiftConfig, ctx: RunContext) -> RunResult:
    if ctx.seeds != 1:
        raise UserError("bias_shift runs one pipeline per run (its classifier seeds are "
                        "readers.seeds); use --set seed=N for other generator seeds")
    for name in ("dit_small", "dit_large"):
        if getattr(cfg.generators, name).image_size != datasets.IMAGE_SIZE:
            raise UserError(f"generators.{name}.image_size must be {datasets.IMAGE_SIZE}")
    # Several processes: the training stages split every batch over all devices (the state
    # replicated); rendering, sampling and evaluation run on every process alone.
    mesh = make_mesh(data=-1) if jax.process_count() > 1 else None
    st = Stages(ctx.run_dir, ctx.resume)
    t0 = time.time()
    data, _, _ = st.run("data", lambda: stage_data(cfg))
    _, reader_params, reader_info = st.run("readers", lambda: stage_readers(cfg, data, mesh))
    clfs, reg = load_readers(cfg, reader_params, reader_info)
    gens, gen_params, _ = st.run("generators", lambda: stage_generators(cfg, data, mesh))
    _, _, res = st.run("eval", lambda: stage_eval(cfg, data, gens, clfs, reg))
    if is_main_process():
        write_json(ctx.run_dir.path / "stages.json", {"seconds": st.seconds,
                                                       "wall_this_run": round(time.time() - t0, 1)})
    r, g = cfg.readers, cfg.generators
    steps = (len(classifier_names(cfg)) * r.steps + r.regressor_steps + 2 * g.dit_steps
             + g.vae_steps)
    return RunResult(params={"readers": reader_params, "generators": gen_params},
                     metrics=flat_metrics(res), steps=steps)


def flat_metrics(res: dict) -> dict[str, float]:
    m: dict[str, float] = {}
    for a, ra in res["attributes"].items():
        for g, en in ra["sets"].items():
            m[f"{a}/{g}/true_shift"] = en["true"]["shift"]
            m[f"{a}/{g}/measured_shift_mean"] = en["sensitivity"]["mean"]
            m[f"{a}/{g}/measured_shift_std"] = en["sensitivity"]["std"]
    for g, v in res["fd"].items():
        m[f"fd/{g}"] = float(v)
    return m


# --- report -------------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:+.{digits}f}"


def _ci(ci: dict) -> str:
    return f"{100 * ci['shift']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def control_summary(res: dict, cnames: list[str]) -> dict:
    """Finding 2 on the renderer+ control alone (exact truth): spread over classifiers,
    mean |measured - exact| and verdict counts, binary vs spectrum attributes."""
    attrs = res["attributes"]
    if not all("renderer+" in ra["sets"] for ra in attrs.values()):
        return {}
    out: dict[str, Any] = {}
    for kind, spectrum in (("binary", False), ("spectrum", True)):
        names = [a for a in attrs if attrs[a]["spectrum"] == spectrum]
        ens = [attrs[a]["sets"]["renderer+"] for a in names]
        out[f"spread_{kind}"] = float(np.mean([en["sensitivity"]["std"] for en in ens]))
        out[f"abs_disc_{kind}"] = float(np.mean([abs(en["discrepancy"][c]) for en in ens
                                                 for c in cnames]))
        counts: dict[str, int] = {}
        for en in ens:
            for v in en["verdict"].values():
                counts[v] = counts.get(v, 0) + 1
        out[f"verdicts_{kind}"] = counts
        cis = [en["discrepancy_ci"][c] for en in ens for c in cnames
               if "discrepancy_ci" in en]
        out[f"significant_{kind}"] = (sum(ci["low"] > 0 or ci["high"] < 0 for ci in cis),
                                      len(cis))
    return out


def findings_text(res: dict, cnames: list[str]) -> str:
    f = res["findings"]
    ma = f["mean_abs"]
    fd = res["fd"]
    lines = []
    # finding 1: sizes of the shift, families and sizes, FD
    ab = lambda x: f"{100 * x:.1f}"  # noqa: E731
    rows = [[GEN_TITLES[g], ab(ma[g]["true_binary"]), ab(ma[g]["true_spectrum"]),
             ab(ma[g]["measured_binary"]), ab(ma[g]["measured_spectrum"]),
             _num(fd[g], 1)] for g in GENERATORS]
    rows.append(["real vs real", "-", "-", "-", "-", _num(fd["real floor"], 1)])
    lines.append(plots.markdown_table(rows, ["generator", "true ABS binary (%)",
                                             "true ABS spectrum (%)",
                                             "measured ABS binary (%, mean over classifiers)",
                                             "measured ABS spectrum (%)", FD_NAME]))
    t = f["mean_abs_true_all"]
    small, large, vae = t["dit_small"], t["dit_large"], t["vae"]
    dif = min(small, large)
    lines.append(
        f"\n**Finding 1 (shift size, family, model size, FID).** Mean true ABS over the five "
        f"attributes: DiT small {100 * small:.1f}%, DiT large {100 * large:.1f}%, VAE "
        f"{100 * vae:.1f}%. Diffusion shifts {'less' if dif < vae else 'not less'} than the "
        f"other family (best DiT {100 * dif:.1f}% vs VAE {100 * vae:.1f}%); the larger DiT "
        f"shifts {'less' if large < small else 'not less'} than the smaller one. The paper's "
        f"magnitudes (~1% binary, 3-5% spectrum) are "
        + ("reproduced" if all(ma[g]["true_binary"] < 0.02 and ma[g]["true_spectrum"] < 0.06
                               for g in GENERATORS) else "not reproduced")
        + " at this scale. Spearman correlation of FD with the mean true ABS over the three "
        f"generators: {_num(f['fd_vs_abs_spearman'])} (three points: a rank agreement of 1.0 "
        f"happens by chance 1 time in 6, so this cannot show that FD tracks or does not track "
        f"the shift).")
    # finding 2: classifier dependence, binary vs spectrum, boundary density
    corr = res["correlation"]
    bm = corr["boundary_mass"]
    lines.append(
        f"\n**Finding 2 (classifier dependence).** Standard deviation of the measured shift over "
        f"the {len(cnames)} classifiers ({', '.join(cnames)}), mean over generators: binary "
        f"attributes {100 * f['spread']['binary']:.2f} points, spectrum attributes "
        f"{100 * f['spread']['spectrum']:.2f} points "
        f"({'larger for spectrum, as the paper finds' if f['spread']['spectrum'] > f['spread']['binary'] else 'not larger for spectrum attributes: the paper finding does not reproduce here'}). "
        f"Across the {corr['num_points']} (attribute, generator) pairs, the mean |measured - "
        f"true| shift correlates with the classifiers' boundary mass (|log-odds| < "
        f"margin) at Pearson {_num(bm['pearson_abs_discrepancy'])} / Spearman "
        f"{_num(bm['spearman_abs_discrepancy'])}; the spread over classifiers at Pearson "
        f"{_num(bm['pearson_spread'])} / Spearman {_num(bm['spearman_spread'])}. With the "
        f"true-value density at the boundary instead: Pearson "
        f"{_num(corr['value_density']['pearson_abs_discrepancy'])} / Spearman "
        f"{_num(corr['value_density']['spearman_abs_discrepancy'])}.")
    ctl = control_summary(res, cnames)
    if ctl:
        lines.append(
            f"\nOn the renderer+ control (in-distribution images, exact truth: the cleanest test "
            f"here), the spread over classifiers is {100 * ctl['spread_binary']:.2f} points for "
            f"binary and {100 * ctl['spread_spectrum']:.2f} for spectrum attributes; mean "
            f"|measured - exact| {100 * ctl['abs_disc_binary']:.2f} vs "
            f"{100 * ctl['abs_disc_spectrum']:.2f} points; verdicts binary "
            + ", ".join(f"{k} {v}" for k, v in sorted(ctl["verdicts_binary"].items()))
            + "; spectrum " + ", ".join(f"{k} {v}" for k, v in sorted(ctl["verdicts_spectrum"].items()))
            + ". Paired bootstrap of measured - exact on the same images (the noise the two "
            f"shifts share cancels): the discrepancy excludes 0 for "
            f"{ctl['significant_binary'][0]} of {ctl['significant_binary'][1]} (binary) and "
            f"{ctl['significant_spectrum'][0]} of {ctl['significant_spectrum'][1]} (spectrum) "
            "classifier-attribute pairs.")
    vc = f["verdict_counts"]
    lines.append("\nVerdicts of every (attribute, generator, classifier) against the true shift "
                 "(CI overlap): " + ", ".join(f"{k} {v}" for k, v in sorted(vc.items())) + ".")
    return "\n".join(lines)


def report(run_dir: RunDir) -> str:
    cfg = load_json(BiasShiftConfig, run_dir.config_path)
    st = Stages(run_dir, resume=True)
    missing = [s for s in STAGES if not (st.root / s / "done.json").exists()]
    if missing:
        text = (f"# bias_shift\n\nThe run is not finished: stages {', '.join(missing)} have no "
                "output yet.\n")
        run_dir.report_path.write_text(text)
        return str(run_dir.report_path)
    data, _, data_info = st.load("data")
    _, _, reader_info = st.load("readers")
    gens, _, gen_info = st.load("generators")
    arr, _, res = st.load("eval")
    cnames = res["classifiers"]
    shifted = res["generators"]
    attrs = res["attributes"]
    pd = run_dir.plots_dir
    figures = []
    # sample grids
    g_n = cfg.eval.grid_images
    for name, imgs in [("real (validation)", data["val_images"]),
                       *[(GEN_TITLES[g], gens[f"{g}_images"]) for g in GENERATORS]]:
        path = pd / f"grid_{name.split()[0].lower()}_{len(figures)}.png"
        ev.save_grid(imgs[:g_n], path, nrow=8)
        figures.append((f"samples: {name}", path))
    # true vs measured scatter
    figures.append(("true vs measured shift (each point: attribute x generator x classifier; "
                    "the diagonal is a faithful classifier)",
                    scatter_true_measured(pd / "true_vs_measured.png", attrs, shifted, cnames)))
    figures.append(("|measured - true| against the classifiers' boundary mass",
                    scatter_boundary(pd / "discrepancy_vs_boundary.png", res, cnames, shifted)))
    figures.append(("logit histograms near the threshold (validation vs generated, first CNN)",
                    logit_histograms(pd / "logit_histograms.png", arr, attrs, cnames,
                                     cfg.eval.logit_margin)))
    figures.append(("measured shift as the decision threshold moves (DiT large; lines: "
                    "classifiers, dashed: true shift)",
                    sweep_plot(pd / "threshold_sweep.png", attrs, cnames, cfg.eval.thresholds,
                               "dit_large")))
    figures.append((f"{FD_NAME} vs mean true ABS per generator",
                    fd_plot(pd / "fd_vs_shift.png", res)))
    # tables
    rows = []
    for a, ra in attrs.items():
        for g in shifted:
            en = ra["sets"][g]
            ref = en.get("exact", en["true"])
            by_arch = {arch: [en["measured"][c]["shift"] for c in cnames if c.startswith(arch)]
                       for arch in cfg.readers.archs}
            rows.append([a, "spectrum" if ra["spectrum"] else "binary", GEN_TITLES[g],
                         _ci(ref)] + [f"{100 * np.mean(v):+.1f} ± {100 * np.std(v, ddof=1 if len(v) > 1 else 0):.1f}"
                                      for v in by_arch.values()]
                        + [_sig(en, cnames),
                           ", ".join(f"{k}:{n}" for k, n in _count(en["verdict"]).items()),
                           f"{100 * np.mean([ra['boundary']['val'][c] for c in cnames]):.1f}"])
    shift_table = plots.markdown_table(
        rows, ["attribute", "type", "generator", "true shift % [95% CI]"]
        + [f"measured by {arch} % (mean ± sd over {cfg.readers.seeds} seeds)"
           for arch in cfg.readers.archs]
        + ["measured - true (paired CI excludes 0)", "verdicts (CI overlap)",
           "val boundary mass %"])
    per_clf = []
    for a, ra in attrs.items():
        per_clf.append([a] + [f"{100 * ra['classifier_rate_error_val'][c]:+.1f}" for c in cnames]
                       + [f"{100 * ra['regressor_rate_error_val']:+.1f}",
                          f"{ra['regressor_label_accuracy_val']:.3f}"])
    clf_table = plots.markdown_table(per_clf, ["attribute"] + [f"{c} rate error %" for c in cnames]
                                     + ["regressor rate error %", "regressor label accuracy"])
    bias_rows = [[a, f"{ra['ideal']:.2f}", _pct(ra["bias"]["train"]), _pct(ra["bias"]["val"])]
                 + [_pct(ra["sets"][g]["bias"]["true"]) for g in GENERATORS]
                 for a, ra in attrs.items()]
    bias_table = plots.markdown_table(bias_rows, ["attribute", "P_ideal", "bias train %",
                                                  "bias val %"]
                                      + [f"bias {GEN_TITLES[g]} % (true)" for g in GENERATORS])
    ctl_rows = [[a, _ci(ra["sets"]["renderer+"]["exact"]), _ci(ra["sets"]["renderer+"]["true"])]
                for a, ra in attrs.items() if "renderer+" in ra["sets"]]
    ctl_table = plots.markdown_table(ctl_rows, ["attribute", "renderer+ exact shift % [CI]",
                                                "regressor-read shift % [CI]"])
    reg_err = reader_info["regressor"]["val_errors"]
    acc_rows = [[c] + [_num(reader_info["val_accuracy"][c][a], 3) for a in attrs]
                for c in cnames]
    acc_table = plots.markdown_table(acc_rows, ["classifier"] + list(attrs))
    gen_rows = [[GEN_TITLES[g], gen_info[g]["params"], _num(gen_info[g]["loss_last"], 3),
                 gen_info[g]["train_seconds"], gen_info[g]["sample_seconds"]] for g in GENERATORS]
    gen_table = plots.markdown_table(gen_rows, ["generator", "parameters", "final loss",
                                                "train s", "sample s"])
    seconds = read_json(run_dir.path / "stages.json")["seconds"] \
        if (run_dir.path / "stages.json").exists() else {}
    d = cfg.data
    text = (
        f"# bias_shift: bias shift of unconditional generators on rendered shapes\n\n"
        f"Training data: {d.num_train} renders skewed to {', '.join(d.skew)} (ideal reference "
        f"{', '.join(cfg.attributes.ideal)}); validation {d.num_val} renders of the same "
        f"distribution; classifiers ({', '.join(cnames)}) and the parameter regressor trained on "
        f"{d.num_reader} renders of the ideal distribution; {cfg.generators.num_samples} samples "
        f"per generator. True shift = regressor-read rate on samples - regressor-read rate on the "
        f"validation set (for renderer+ the exact rates from the recorded parameters); measured "
        f"shift = the same with each classifier (label = log-odds > 0). CIs: percentile "
        f"bootstrap, {cfg.eval.bootstrap} resamples.\n\n"
        f"## Findings\n\n{findings_text(res, cnames)}\n\n"
        f"## True vs measured shift per attribute\n\n{shift_table}\n\n"
        f"## Bias against the ideal reference\n\n{bias_table}\n\n"
        f"## Readers\n\nClassifier accuracy on the validation set:\n\n{acc_table}\n\n"
        f"Rate error on the validation set (classifier-read rate - exact rate), and the "
        f"regressor's:\n\n{clf_table}\n\n"
        f"Parameter regressor on validation renders: kind accuracy "
        f"{reg_err['kind_accuracy']:.3f}, background accuracy {reg_err['background_accuracy']:.3f}, "
        f"hue MAE {reg_err['hue_mae']:.4f} (circular, of 1), size MAE {reg_err['size_mae']:.4f} "
        f"({100 * reg_err['size_mae_of_range']:.1f}% of the size range). Every true attribute "
        f"of a generated image carries this error (brightness excepted: it is read from the "
        f"pixels). On the renderer+ control, whose true shift is known exactly, the "
        f"regressor's reading of the shift against the exact one:\n\n{ctl_table}\n\n"
        f"## Generators\n\n{gen_table}\n\n"
        f"Stage times (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + "\n\n"
        + "\n".join(f"**{title}**\n\n![{p.stem}]({p.relative_to(run_dir.path)})\n"
                    for title, p in figures))
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


def _sig(en: dict, cnames: list[str]) -> str:
    """Mean measured - true over classifiers, and how many classifiers' paired CI excludes 0."""
    if "discrepancy_ci" not in en:
        return "-"
    cis = [en["discrepancy_ci"][c] for c in cnames]
    n = sum(ci["low"] > 0 or ci["high"] < 0 for ci in cis)
    return f"{100 * np.mean([ci['shift'] for ci in cis]):+.1f} ({n}/{len(cis)})"


def _count(verdicts: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in verdicts.values():
        out[v] = out.get(v, 0) + 1
    return out


def _plt():
    return plots._pyplot()


def _save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def scatter_true_measured(path, attrs, gens, cnames):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    markers = {"cnn": "o", "mlp": "^"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lim = 0.0
    for i, (a, ra) in enumerate(attrs.items()):
        for g in gens:
            en = ra["sets"][g]
            t = en.get("exact", en["true"])["shift"]
            for c in cnames:
                m = en["measured"][c]["shift"]
                lim = max(lim, abs(t), abs(m))
                ax.scatter(100 * t, 100 * m, marker=markers.get(c.rstrip("0123456789"), "s"),
                           color=colours[i % len(colours)], alpha=0.7, s=22,
                           label=f"{a} ({'spectrum' if ra['spectrum'] else 'binary'})"
                           if (g == gens[0] and c == cnames[0]) else None)
    lim = 100 * lim * 1.1 + 0.5
    ax.plot([-lim, lim], [-lim, lim], "k--", linewidth=1)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.axvline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("true shift (%)")
    ax.set_ylabel("measured shift (%)  o: CNN, ^: MLP")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def scatter_boundary(path, res, cnames, gens):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in discrepancy_rows(res, cnames, gens):
        ax.scatter(100 * r["boundary_mass"], 100 * r["abs_discrepancy"],
                   marker="o" if r["spectrum"] else "x", color="C1" if r["spectrum"] else "C0")
        ax.annotate(f"{r['attribute']}/{r['generator']}", (100 * r["boundary_mass"],
                                                           100 * r["abs_discrepancy"]),
                    fontsize=6, alpha=0.7)
    ax.set_xlabel("boundary mass: % of images with |log-odds| < margin (mean of val and gen)")
    ax.set_ylabel("|measured - true| shift (%, mean over classifiers)")
    ax.set_title("o: spectrum attributes, x: binary")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def logit_histograms(path, arr, attrs, cnames, margin):
    plt = _plt()
    names = list(attrs)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), dpi=110)
    c = cnames[0]
    for ax, a in zip(np.atleast_1d(axes), names):
        for s, colour in (("val", "k"), ("dit_large", "C1"), ("vae", "C2")):
            key = f"logit/{s}/{c}/{a}"
            if key not in arr:
                continue
            dens, edges = B.logit_histogram(jnp.asarray(arr[key]), 0.0, 6.0, 24)
            ax.stairs(np.asarray(dens), np.asarray(edges), color=colour, label=s)
        ax.axvspan(-margin, margin, color="gray", alpha=0.15)
        ax.set_title(f"{a} ({'spectrum' if attrs[a]['spectrum'] else 'binary'})", fontsize=9)
        ax.set_xlabel("log-odds")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    return _save(fig, path)


def sweep_plot(path, attrs, cnames, thresholds, gen):
    plt = _plt()
    names = list(attrs)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), dpi=110, sharey=True)
    for ax, a in zip(np.atleast_1d(axes), names):
        en = attrs[a]["sets"][gen]
        for c in cnames:
            ax.plot(thresholds, 100 * np.asarray(en["sweep"][c]),
                    color="C0" if c.startswith("cnn") else "C3", alpha=0.7)
        ax.axhline(100 * en["true"]["shift"], color="k", linestyle="--")
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("threshold on P(a|x)")
    np.atleast_1d(axes)[0].set_ylabel("measured shift (%)  blue: CNN, red: MLP")
    return _save(fig, path)


def fd_plot(path, res):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    t = res["findings"]["mean_abs_true_all"]
    for g in GENERATORS:
        ax.scatter(res["fd"][g], 100 * t[g])
        ax.annotate(GEN_TITLES[g], (res["fd"][g], 100 * t[g]), fontsize=8)
    ax.axvline(res["fd"]["real floor"], color="gray", linestyle="--", label="real vs real")
    ax.set_xlabel(FD_NAME)
    ax.set_ylabel("mean true ABS over attributes (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


EXPERIMENT = Experiment(
    name="bias_shift",
    description="bias shift of unconditional generators (DiT x2, VAE) on rendered shapes: "
                "classifier-measured vs true shift, boundary density (arXiv 2506.09106)",
    config_cls=BiasShiftConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
