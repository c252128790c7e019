"""generative.datasets: renderer against geometry, PNG/tfds round trip, grain determinism and
resumption, digits against jax.image.resize."""

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generative import datasets as D

N_TRAIN, N_TEST = 24, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_data")
    D.build("shapes", root, N_TRAIN, N_TEST, seed=5)
    D.build("digits", root, 40, 10, seed=5)
    return root


def _shape_rgb(hue):
    return np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255).astype(np.uint8)


# --- renderer ------------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed():
    a = D.shape_example(3, "train", 7)
    b = D.shape_example(3, "train", 7)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"]
    c = D.shape_example(4, "train", 7)
    d = D.shape_example(3, "test", 7)
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["image"], d["image"])


def test_attribute_ranges_and_caption_words():
    seen_kinds, seen_bg = set(), set()
    for i in range(200):
        ex = D.shape_example(0, "train", i)
        assert 0 <= ex["hue"] < 1 and 0 <= ex["background_hue"] < 1
        assert D.SIZE_RANGE[0] <= ex["size"] <= D.SIZE_RANGE[1]
        for c in ("x", "y"):  # the whole shape is inside the image
            assert ex["size"] <= ex[c] <= 1 - ex["size"]
        assert 0 <= ex["rotation"] < 2 * math.pi + 1e-6
        words = ex["caption"].split()
        assert D.SHAPE_KINDS[ex["kind"]] in words
        assert D.colour_name(ex["hue"]) in words
        assert D.size_name(ex["size"]) in words
        assert D.colour_name(ex["background_hue"]) in words
        bg = D.BACKGROUND_KINDS[ex["background"]]
        assert D.BACKGROUND_WORDS[bg] in words
        seen_kinds.add(ex["kind"])
        seen_bg.add(ex["background"])
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert seen_kinds == set(range(len(D.SHAPE_KINDS)))
    assert seen_bg == set(range(len(D.BACKGROUND_KINDS)))


def test_colour_and_size_words_hand_cases():
    assert D.colour_name(0.0) == "red" and D.colour_name(0.99) == "red"
    assert D.colour_name(1 / 3) == "green" and D.colour_name(2 / 3) == "blue"
    assert D.colour_name(1 / 6) == "yellow" and D.colour_name(0.5) == "cyan"
    assert D.size_name(0.13) == "small" and D.size_name(0.2) == "medium"
    assert D.size_name(0.29) == "large"
    attrs = {"kind": 2, "hue": 0.0, "size": 0.13, "background": 1, "background_hue": 0.62}
    assert D.shape_caption(attrs) == "a small red triangle on blue stripes"
    assert D.shape_caption({**attrs, "background": 0}) == "a small red triangle on plain blue"


def test_centre_pixel_has_the_shape_colour():
    # The pixel holding the shape's centre lies inside every kind at every size (the thinnest
    # part, a cross arm, is 0.32 * 0.12 * 32 = 1.2 px from the centre > half a pixel diagonal
    # in each axis), so area averaging leaves it exactly the shape colour.
    for i in range(100):
        ex = D.shape_example(1, "train", i)
        r, c = int(ex["y"] * 32), int(ex["x"] * 32)
        np.testing.assert_array_equal(ex["image"][r, c], _shape_rgb(ex["hue"]), err_msg=str(i))


@pytest.mark.parametrize("kind,area", [
    ("circle", lambda r: math.pi * r * r),
    ("square", lambda r: 2 * r * r),                            # half-diagonal r
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * r * r),        # circumradius r
    ("cross", lambda r: 2 * (2 * r) * (0.64 * r) - (0.64 * r) ** 2),
    ("star", lambda r: 5 * r * (0.45 * r) * math.sin(math.pi / 5)),  # 10 triangles R, r_in
])
def test_rendered_area_matches_geometry(kind, area):
    # On a plain background, pixel = bg (1 - a) + fg a with a the covered fraction; summing a
    # over the image gives the shape's area in pixels, up to the 4x4 supersampling error: the
    # cells cut by the boundary (~4 per pixel of perimeter, 1/16 px^2 each) are all-or-nothing;
    # measured errors were 0.4-1.9 % at this size, a wrong formula or scale is off by >> 4 %.
    for rotation in (0.0, 0.7):
        attrs = {"kind": D.SHAPE_KINDS.index(kind), "hue": 0.6, "size": 0.27, "x": 0.5,
                 "y": 0.5, "rotation": rotation, "background": 0, "background_hue": 0.1,
                 "texture_seed": 0}
        img = D.render_shape(attrs).astype(np.float64)
        fg = np.array(colorsys.hsv_to_rgb(0.6, 0.85, 0.95)) * 255
        bg = np.array(colorsys.hsv_to_rgb(0.1, 0.45, 0.30)) * 0.5 + np.array(
            colorsys.hsv_to_rgb(0.1, 0.45, 0.55)) * 0.5
        ch = int(np.argmax(np.abs(fg - bg * 255)))
        cover = (img[..., ch] - bg[ch] * 255) / (fg[ch] - bg[ch] * 255)
        expected = area(0.27 * 32)
        assert abs(cover.sum() - expected) / expected < 0.04, (kind, cover.sum(), expected)


# --- digits --------------------------------------------------------------------------------------


def test_bilinear_upscale_matches_jax_image_resize():
    from sklearn.datasets import load_digits

    small = load_digits().images[:5].astype(np.float64) / 16.0
    images, labels = D.digits_arrays()
    ref = jax.image.resize(jnp.asarray(small), (5, 32, 32), "linear", antialias=False)
    ref = np.clip(np.round(np.asarray(ref, np.float64) * 255), 0, 255)
    # jax computes in float32: allow a 1-level rounding difference
    assert np.abs(images[:5, ..., 0].astype(np.float64) - ref).max() <= 1
    assert np.array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(labels, load_digits().target)


# --- tfds storage --------------------------------------------------------------------------------


def test_shapes_round_trip_through_png_storage(data_dir):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        source = D.data_source("shapes", split, data_dir)
        assert len(source) == n
        seen = set()
        for i in range(n):
            rec = source[i]
            stored = D.decode_png(rec["image"])
            attrs = {k: rec[k] for k in D.SHAPE_FIELDS}
            # re-render from the stored (float32) attributes: bit-identical pixels
            np.testing.assert_array_equal(stored, D.render_shape(attrs))
            assert rec["caption"].decode() == D.shape_caption(attrs)
            seen.add(int(rec["texture_seed"]))
        assert len(seen) == n  # every stored record is a distinct example
    # the stored examples are exactly examples 0..n-1 of the seed (in tfds' shuffled order)
    want = {D.shape_example(5, "test", i)["caption"] + str(D.shape_example(5, "test", i)["x"])
            for i in range(N_TEST)}
    got = {ex["caption"] + str(float(ex["x"])) for ex in D.iterate_examples("shapes", "test",
                                                                         data_dir)}
    assert got == want


def test_digits_round_trip(data_dir):
    images, labels = D.digits_arrays()
    idx = D.digit_split_indices(40, 10, seed=5)
    assert not set(idx["train"]) & set(idx["test"])
    stored = [D.decode_png(r["image"]).tobytes() + bytes([int(r["label"])])
              for r in (D.data_source("digits", "test", data_dir)[i] for i in range(10))]
    want = [images[j].tobytes() + bytes([int(labels[j])]) for j in idx["test"]]
    assert sorted(stored) == sorted(want)
    ex = next(D.iterate_examples("digits", "test", data_dir))
    assert ex["caption"] == "a handwritten " + D.DIGIT_WORDS[ex["label"]]


def test_build_is_deterministic(tmp_path, data_dir):
    D.build("shapes", tmp_path, N_TRAIN, N_TEST, seed=5)
    a = D.data_source("shapes", "train", data_dir)
    b = D.data_source("shapes", "train", tmp_path)
    for i in range(N_TRAIN):
        assert a[i]["image"] == b[i]["image"]


def test_missing_and_ambiguous_builds_are_clear_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="build"):
        D.load("shapes", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown data set"):
        D.build("mnist", tmp_path, 1, 1)
    with pytest.raises(ValueError, match="1797"):
        D.build("digits", tmp_path, 1700, 200)
    D.build("shapes", data_dir, 4, 2, seed=0)
    try:
        with pytest.raises(FileNotFoundError, match="several"):
            D.load("shapes", "train", data_dir)
        it = D.load("shapes", "train", data_dir, config="n4_2_s0", batch_size=2)
        assert next(it)["image"].shape == (2, 32, 32, 3)
    finally:
        import shutil
        shutil.rmtree(data_dir / "shapes" / "n4_2_s0")


# --- grain loading -------------------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batches_types_and_ranges(data_dir):
    it = D.load("shapes", "train", data_dir, batch_size=8, seed=0)
    b = next(it)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    for k, dt in D.SHAPE_FIELDS.items():
        assert b[k].shape == (8,)
        assert b[k].dtype == (np.int32 if dt == np.int64 else np.float32)
    assert b["caption"].shape == (8,) and isinstance(b["caption"][0], str)
    # image values are the stored PNG's uint8 values mapped by x / 127.5 - 1
    np.testing.assert_allclose((b["image"] + 1) * 127.5, np.round((b["image"] + 1) * 127.5),
                               atol=1e-4)
    d = next(D.load("digits", "train", data_dir, batch_size=4))
    assert d["image"].shape == (4, 32, 32, 3) and d["label"].dtype == np.int32


def test_shuffle_is_deterministic_per_seed_and_epochs_cover_the_data(data_dir):
    a = _take(D.load("shapes", "train", data_dir, batch_size=8, seed=1), 6)
    b = _take(D.load("shapes", "train", data_dir, batch_size=8, seed=1), 6)
    c = _take(D.load("shapes", "train", data_dir, batch_size=8, seed=2), 3)
    for x, y in zip(a, b):
        _same(x, y)
    order = lambda batches: [s for bt in batches for s in bt["texture_seed"].tolist()]  # noqa
    assert order(a[:3]) != order(c)
    # 24 examples, batches of 8: each epoch (3 batches) is a permutation of the split, and
    # the two epochs are shuffled differently
    everything = sorted(int(r["texture_seed"]) for r in (
        D.data_source("shapes", "train", data_dir)[i] for i in range(N_TRAIN)))
    assert sorted(order(a[:3])) == everything and sorted(order(a[3:])) == everything
    assert order(a[:3]) != order(a[3:])


def test_num_examples_and_single_epoch(data_dir):
    batches = list(D.load("shapes", "train", data_dir, num_examples=10, batch_size=4,
                          num_epochs=1, drop_remainder=False))
    assert [len(b["kind"]) for b in batches] == [4, 4, 2]
    source = D.data_source("shapes", "train", data_dir)
    first10 = sorted(int(source[i]["texture_seed"]) for i in range(10))
    assert sorted(s for b in batches for s in b["texture_seed"].tolist()) == first10
    with pytest.raises(ValueError, match="num_examples"):
        D.load("shapes", "train", data_dir, num_examples=N_TRAIN + 1)


@pytest.mark.parametrize("skip", [2, 4])  # 4 crosses the epoch boundary (3 batches / epoch)
def test_iterator_state_resumes_exactly(data_dir, skip):
    it = D.load("shapes", "train", data_dir, batch_size=8, seed=3)
    _take(it, skip)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = D.load("shapes", "train", data_dir, batch_size=8, seed=3)
    fresh.set_state(state)
    for x, y in zip(_take(fresh, 3), expected):
        _same(x, y)
