"""Image data sets for the generative methods, built once as tfds ``array_record`` files.

Two data sets, both 32x32 RGB:

``shapes``
    procedurally rendered shapes (circle, square, triangle, star, cross) with a continuous hue,
    size, position and rotation, on a textured background (plain, stripes, checker, dots,
    noise) of its own hue. Every attribute is recorded, and a caption is made from them
    ("a small red triangle on blue stripes"). Rendering is a pure function of the recorded
    attributes (:func:`render_shape`), antialiased by 4x4 supersampling and box downsampling.
``digits``
    scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package), upscaled
    to 32x32 by bilinear interpolation (half-pixel centres, edges clamped) and replicated to RGB.

Writing: :func:`build` runs a ``tfds.core.GeneratorBasedBuilder`` with
``file_format="array_record"``; images are stored as PNG bytes (encoded with Pillow) and
attributes as int64/float32 scalars, the caption as text. No TensorFlow is needed: tfds
serialises its own Example protos and the tfds ``Image`` feature (which would need TF) is not
used. The builder config name records the sizes and the seed (``n{train}_{test}_s{seed}``),
so data sets of different sizes live side by side under ``data_dir/<name>/``.

Reading: :func:`load` opens the prepared directory with ``tfds.builder_from_directory`` (no
builder class needed), takes ``as_data_source()`` of one split and builds a ``grain``
pipeline: ``MapDataset.source -> [:num_examples] -> shuffle(seed) -> repeat -> map(decode)
-> batch``. Shuffling is grain's index shuffle, deterministic per seed and different in each
epoch; the iterator's ``get_state()``/``set_state()`` resume it exactly (the state is the next
index). Batches are dicts of numpy arrays: ``image`` float32 ``[B, 32, 32, 3]`` in ``[-1, 1]``
plus one array per attribute (and ``caption``, a numpy array of ``str``).

Example examples are generated from ``np.random.default_rng([seed, split, index])``, so the
content of a data set depends only on ``(name, num_train, num_test, seed)``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
BACKGROUND_KINDS = ("plain", "stripes", "checker", "dots", "noise")
BACKGROUND_WORDS = {"plain": "plain", "stripes": "stripes", "checker": "checks", "dots": "dots",
                    "noise": "noise"}
SIZE_RANGE = (0.12, 0.30)  # shape radius as a fraction of the image width
SIZE_WORDS = ((0.18, "small"), (0.24, "medium"), (math.inf, "large"))
# (upper hue bound, name); hue 0 = red, wraps around at 1.
COLOUR_WORDS = ((0.042, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"),
                (0.53, "cyan"), (0.70, "blue"), (0.80, "purple"), (0.93, "pink"),
                (1.0, "red"))
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

NAMES = ("shapes", "digits")
SPLITS = ("train", "test")
VERSION = "1.0.0"

# Attributes stored with each example (besides the PNG and the caption), with their dtypes.
SHAPE_FIELDS = {"kind": np.int64, "hue": np.float32, "size": np.float32, "x": np.float32,
                "y": np.float32, "rotation": np.float32, "background": np.int64,
                "background_hue": np.float32, "texture_seed": np.int64}
DIGIT_FIELDS = {"label": np.int64}
FIELDS = {"shapes": SHAPE_FIELDS, "digits": DIGIT_FIELDS}


# --- words -------------------------------------------------------------------------------------


def colour_name(hue: float) -> str:
    """The colour word of a hue in ``[0, 1)`` (HSV hue; 0 = red)."""
    hue = float(hue) % 1.0
    for bound, word in COLOUR_WORDS:
        if hue < bound:
            return word
    return COLOUR_WORDS[-1][1]


def size_name(size: float) -> str:
    for bound, word in SIZE_WORDS:
        if size < bound:
            return word
    return SIZE_WORDS[-1][1]


def shape_caption(attrs: Mapping[str, Any]) -> str:
    """``"a {size} {colour} {kind} on {background colour} {background}"``, e.g.
    ``"a small red triangle on blue stripes"`` (``"... on plain blue"`` for a plain one)."""
    background = BACKGROUND_KINDS[int(attrs["background"])]
    bg_colour = colour_name(attrs["background_hue"])
    where = (f"plain {bg_colour}" if background == "plain"
             else f"{bg_colour} {BACKGROUND_WORDS[background]}")
    return (f"a {size_name(attrs['size'])} {colour_name(attrs['hue'])} "
            f"{SHAPE_KINDS[int(attrs['kind'])]} on {where}")


def digit_caption(label: int) -> str:
    return f"a handwritten {DIGIT_WORDS[int(label)]}"


# --- shape renderer ----------------------------------------------------------------------------


def sample_shape_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Random attributes of one shapes image. Floats are rounded to float32 so that rendering
    from the stored (float32) attributes reproduces the image bit for bit."""
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    size = f32(rng.uniform(*SIZE_RANGE))
    margin = size + 0.02
    return {
        "kind": int(rng.integers(len(SHAPE_KINDS))),
        "hue": f32(rng.uniform(0.0, 1.0)) % 1.0,
        "size": size,
        "x": f32(rng.uniform(margin, 1.0 - margin)),
        "y": f32(rng.uniform(margin, 1.0 - margin)),
        "rotation": f32(rng.uniform(0.0, 2.0 * math.pi)),
        "background": int(rng.integers(len(BACKGROUND_KINDS))),
        "background_hue": f32(rng.uniform(0.0, 1.0)) % 1.0,
        "texture_seed": int(rng.integers(2 ** 31)),
    }


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float64)


def _inside_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for every point (px, py)."""
    inside = np.zeros(px.shape, bool)
    n = len(verts)
    for i in range(n):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def _regular_star(points: int, r_out: float, r_in: float) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


def shape_mask(kind: int, size: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Boolean coverage of a shape centred at the origin in its own (rotated) frame; ``size``
    is the circumradius (the square's half-diagonal, the cross's arm length)."""
    name = SHAPE_KINDS[kind]
    if name == "circle":
        return px ** 2 + py ** 2 <= size ** 2
    if name == "square":
        half = size / math.sqrt(2.0)
        return (np.abs(px) <= half) & (np.abs(py) <= half)
    if name == "triangle":
        angles = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        verts = np.stack([size * np.cos(angles), size * np.sin(angles) + size / 4], -1)
        return _inside_polygon(px, py, verts)
    if name == "star":
        return _inside_polygon(px, py, _regular_star(5, size, 0.45 * size))
    if name == "cross":
        arm = 0.32 * size
        return (((np.abs(px) <= arm) & (np.abs(py) <= size))
                | ((np.abs(py) <= arm) & (np.abs(px) <= size)))
    raise ValueError(f"unknown shape kind {kind}")


def background_texture(kind: int, hue: float, texture_seed: int, n: int) -> np.ndarray:
    """``[n, n, 3]`` float64 background in [0, 1] on an ``n x n`` (supersampled) grid. Texture
    parameters (stripe angle and period, checker size, dot spacing) come from ``texture_seed``."""
    rng = np.random.default_rng(texture_seed)
    dark, light = _hsv(hue, 0.45, 0.30), _hsv(hue, 0.45, 0.55)
    coords = (np.arange(n) + 0.5) / n
    u, v = np.meshgrid(coords, coords, indexing="xy")  # u: column (x), v: row (y)
    name = BACKGROUND_KINDS[kind]
    if name == "plain":
        t = np.full((n, n), 0.5)
    elif name == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.12, 0.25)
        phase = rng.uniform(0, 1)
        t = ((u * math.cos(angle) + v * math.sin(angle)) / period + phase) % 1.0 < 0.5
    elif name == "checker":
        cells = int(rng.integers(3, 7))
        t = (np.floor(u * cells) + np.floor(v * cells)) % 2 == 0
    elif name == "dots":
        cells = int(rng.integers(4, 8))
        fu, fv = (u * cells) % 1.0 - 0.5, (v * cells) % 1.0 - 0.5
        t = fu ** 2 + fv ** 2 <= 0.3 ** 2
    elif name == "noise":
        # value noise: a coarse random grid upsampled by nearest neighbour (blocks of 4 px)
        coarse = rng.uniform(0, 1, (IMAGE_SIZE // 4, IMAGE_SIZE // 4))
        idx = np.minimum((coords * coarse.shape[0]).astype(int), coarse.shape[0] - 1)
        t = coarse[idx][:, idx]
    else:
        raise ValueError(f"unknown background kind {kind}")
    t = np.asarray(t, np.float64)[..., None]
    return dark * (1 - t) + light * t


def render_shape(attrs: Mapping[str, Any], size: int = IMAGE_SIZE,
                 supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Render one shapes image from its attributes: uint8 ``[size, size, 3]``.

    The shape (colour HSV(hue, 0.85, 0.95)) is drawn over the background on a grid
    ``supersample`` times finer, then each output pixel is the mean of its
    ``supersample x supersample`` block (area antialiasing). Coordinates are fractions of the
    image width, ``x`` to the right and ``y`` down; the shape frame is rotated by ``rotation``
    radians about the centre ``(x, y)``.
    """
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    u, v = np.meshgrid(coords, coords, indexing="xy")
    du, dv = u - float(attrs["x"]), v - float(attrs["y"])
    c, s = math.cos(float(attrs["rotation"])), math.sin(float(attrs["rotation"]))
    px, py = c * du + s * dv, -s * du + c * dv  # rotate the grid by -rotation
    mask = shape_mask(int(attrs["kind"]), float(attrs["size"]), px, py)[..., None]
    background = background_texture(int(attrs["background"]), float(attrs["background_hue"]),
                                     int(attrs["texture_seed"]), n)
    fine = np.where(mask, _hsv(float(attrs["hue"]), 0.85, 0.95), background)
    coarse = fine.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.round(coarse * 255.0), 0, 255).astype(np.uint8)


# --- digits ------------------------------------------------------------------------------------


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` bilinear interpolation weights with half-pixel centres (output pixel
    ``i`` samples input coordinate ``(i + 0.5) n_in / n_out - 0.5``, clamped to the edges), the
    convention of ``jax.image.resize(..., "linear")`` for upsampling."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as uint8 ``[N, 32, 32, 3]`` images and int64 labels.

    Pixel values 0..16 (ink = high) are upscaled bilinearly and mapped to 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = data.images.astype(np.float64) / 16.0  # [N, 8, 8]
    w = bilinear_matrix(8, IMAGE_SIZE)
    big = np.einsum("ij,njk,lk->nil", w, small, w)
    grey = np.clip(np.round(big * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), data.target.astype(np.int64)


# --- PNG ---------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


# --- examples ----------------------------------------------------------------------------------


def _example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def shape_example(seed: int, split: str, index: int) -> dict[str, Any]:
    """Attributes, caption and uint8 image of example ``index`` of a shapes split."""
    attrs = sample_shape_attributes(_example_rng(seed, split, index))
    return {**attrs, "caption": shape_caption(attrs), "image": render_shape(attrs)}


def digit_split_indices(num_train: int, num_test: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint indices into :func:`digits_arrays` for the two splits (a seeded permutation)."""
    total = num_train + num_test
    if total > 1797:
        raise ValueError(f"digits has 1797 images; num_train + num_test = {total}")
    perm = np.random.default_rng([seed, 7]).permutation(1797)
    return {"train": perm[:num_train], "test": perm[num_train:total]}


# --- tfds builders -----------------------------------------------------------------------------


def _config_name(num_train: int, num_test: int, seed: int) -> str:
    return f"n{num_train}_{num_test}_s{seed}"


def _builder_class(name: str):
    """The tfds builder class of data set ``name`` (defined lazily: importing tfds is slow)."""
    import tensorflow_datasets as tfds

    if name in _BUILDERS:
        return _BUILDERS[name]

    @dataclasses.dataclass
    class SizeConfig(tfds.core.BuilderConfig):
        num_train: int = 1000
        num_test: int = 200
        seed: int = 0

    fields = FIELDS[name]

    def _info(self):
        features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "caption": tfds.features.Text()}
        features.update({k: tfds.features.Scalar(dtype=dt) for k, dt in fields.items()})
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(num_train=self.builder_config.num_train,
                                            num_test=self.builder_config.num_test,
                                            seed=self.builder_config.seed))

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    if name == "shapes":
        def _generate_examples(self, split, count):
            for i in range(count):
                ex = shape_example(self.builder_config.seed, split, i)
                record = {k: ex[k] for k in fields}
                yield i, {**record, "caption": ex["caption"], "image": encode_png(ex["image"])}
    else:
        def _generate_examples(self, split, count):
            cfg = self.builder_config
            images, labels = digits_arrays()
            idx = digit_split_indices(cfg.num_train, cfg.num_test, cfg.seed)[split]
            assert len(idx) == count
            for i, j in enumerate(idx):
                yield i, {"label": int(labels[j]), "caption": digit_caption(labels[j]),
                          "image": encode_png(images[j])}

    cls = type(name.capitalize() + "32", (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version(VERSION),
        "RELEASE_NOTES": {VERSION: "first release"},
        "BUILDER_CONFIGS": [],
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
        "__module__": __name__,
    })
    cls.name = name  # the directory name under data_dir (tfds would derive "shapes32")
    cls.SizeConfig = SizeConfig
    _BUILDERS[name] = cls
    return cls


_BUILDERS: dict[str, Any] = {}


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")


def build(name: str, data_dir: str | os.PathLike, num_train: int, num_test: int,
          seed: int = 0) -> Path:
    """Write data set ``name`` (``"shapes"`` or ``"digits"``) as tfds array_record files under
    ``data_dir`` unless it is already there; returns the prepared directory
    (``data_dir/<name>/n{train}_{test}_s{seed}/1.0.0``)."""
    _check_name(name)
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
    cls = _builder_class(name)
    config = cls.SizeConfig(name=_config_name(num_train, num_test, seed),
                            version=VERSION, num_train=num_train, num_test=num_test, seed=seed)
    builder = cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def prepared_dir(name: str, data_dir: str | os.PathLike, config: str | None = None) -> Path:
    """The prepared directory of ``name`` under ``data_dir``; ``config`` (``n.._.._s..``) may
    be left out when only one has been built."""
    _check_name(name)
    root = Path(data_dir) / name
    built = sorted(p.parent.parent.name for p in root.glob(f"*/{VERSION}/dataset_info.json"))
    if config is None:
        if len(built) != 1:
            raise FileNotFoundError(
                f"{root}: {'no prepared data set' if not built else 'several data sets: ' + ', '.join(built)}"
                f"; {'run build() first' if not built else 'pass config='}")
        config = built[0]
    path = root / config / VERSION
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(f"{path}: not prepared (built here: {', '.join(built) or 'none'})")
    return path


def data_source(name: str, split: str, data_dir: str | os.PathLike,
                config: str | None = None):
    """Random-access tfds ``ArrayRecordDataSource`` of one split (records as stored: PNG bytes,
    caption bytes, attribute scalars)."""
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    builder = tfds.builder_from_directory(os.fspath(prepared_dir(name, data_dir, config)))
    return builder.as_data_source(split=split)


def decode_record(record: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A stored record as arrays: ``image`` float32 ``[32, 32, 3]`` in [-1, 1] (``x/127.5-1``),
    attributes with int64 -> int32, ``caption`` as ``str``."""
    out: dict[str, Any] = {
        "image": decode_png(record["image"]).astype(np.float32) / np.float32(127.5) - 1.0}
    for key, dtype in FIELDS[name].items():
        value = np.asarray(record[key])
        out[key] = value.astype(np.int32 if dtype == np.int64 else np.float32)
    caption = record["caption"]
    out["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return out


def load(name: str, split: str, data_dir: str | os.PathLike, num_examples: int | None = None,
         seed: int = 0, *, batch_size: int = 64, num_epochs: int | None = None,
         drop_remainder: bool = True, config: str | None = None, read_threads: int = 2):
    """A resumable grain iterator of batches of a prepared split.

    Args:
      name, split, data_dir: which data set (built by :func:`build` under ``data_dir``).
      num_examples: use the first ``num_examples`` stored records of the split (all if None).
      seed: shuffle seed (grain index shuffle; each epoch is permuted differently).
      batch_size: examples per batch.
      num_epochs: passes over the data; None repeats forever (training).
      drop_remainder: drop the last incomplete batch (keep it for evaluation).
      config: which build (``n{train}_{test}_s{seed}``) when several are under ``data_dir``.
      read_threads: grain read threads (the order does not depend on it).
    Returns:
      a grain ``DatasetIterator``: ``next(it)`` is a dict of numpy arrays (``image`` float32
      ``[B, 32, 32, 3]`` in [-1, 1], attribute arrays ``[B]``, ``caption`` ``[B]`` str);
      ``it.get_state()`` / ``it.set_state(state)`` save and restore the position.
    """
    import grain

    source = data_source(name, split, data_dir, config)
    ds = grain.MapDataset.source(source)
    if num_examples is not None:
        if not 1 <= num_examples <= len(ds):
            raise ValueError(f"num_examples={num_examples} but split {split!r} of {name!r} has "
                             f"{len(ds)} examples")
        ds = ds[:num_examples]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(lambda record: decode_record(record, name))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    return iter(ds.to_iter_dataset(options))


def iterate_examples(name: str, split: str, data_dir: str | os.PathLike,
                     config: str | None = None) -> Iterator[dict[str, Any]]:
    """Every stored example of a split in storage order, decoded (for inspection and tests)."""
    source = data_source(name, split, data_dir, config)
    for i in range(len(source)):
        yield decode_record(source[i], name)
