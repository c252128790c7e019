"""generative.evaluation: Frechet distance against the closed form of commuting Gaussians and
against scipy.linalg.sqrtm, k-NN precision/recall on constructed cases and against a
scikit-learn k-NN oracle, attribute labels against the captions' words, the PNG grid read
back, and the attribute classifier's held-out accuracy on rendered shapes."""


import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from generative import datasets as D
from generative import evaluation as E


def _random_cov(rng, f, scale=1.0):
    a = rng.normal(size=(f, f))
    return scale * (a @ a.T / f + 0.1 * np.eye(f))


# --- Frechet distance --------------------------------------------------------------------------


def test_frechet_closed_form_commuting_gaussians():
    """With cov_a = Q diag(a) Q^T, cov_b = Q diag(b) Q^T the distance is
    ||mu_a - mu_b||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    f = 6
    q, _ = np.linalg.qr(rng.normal(size=(f, f)))
    a, b = rng.uniform(0.1, 3.0, f), rng.uniform(0.1, 3.0, f)
    mu_a, mu_b = rng.normal(size=f), rng.normal(size=f)
    expect = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = E.gaussian_frechet_distance(mu_a, (q * a) @ q.T, mu_b, (q * b) @ q.T)
    assert got == pytest.approx(expect, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert E.gaussian_frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(
        9.0 + 1.5 ** 2, rel=1e-12)


def _scipy_reference(feats_a, feats_b):
    """The pytorch-fid computation: sqrtm of the (non-symmetric) product cov_a cov_b."""
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feature_frechet_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    f = 10
    a = rng.multivariate_normal(rng.normal(size=f), _random_cov(rng, f), size=300)
    b = rng.multivariate_normal(rng.normal(size=f), _random_cov(rng, f, 2.0), size=200) ** 2
    got = E.feature_frechet_distance(a, b)
    assert got == pytest.approx(_scipy_reference(a, b), rel=1e-7)
    assert E.feature_frechet_distance(b, a) == pytest.approx(got, rel=1e-9)


def test_feature_frechet_of_samples_converges_to_the_gaussian_distance():
    rng = np.random.default_rng(3)
    f = 4
    mu_a, mu_b = np.zeros(f), np.full(f, 0.5)
    cov_a, cov_b = _random_cov(rng, f), _random_cov(rng, f)
    a = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    b = rng.multivariate_normal(mu_b, cov_b, size=200_000)
    exact = E.gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b)
    assert E.feature_frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert E.feature_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_difference_ci_covers_the_gaussian_oracle():
    """Two Gaussian sets against a Gaussian reference, FDs known in closed form: the interval
    on FD(R, A) - FD(R, B) covers the true difference near its nominal rate over 40 draws (a
    swapped sign or a percentile/basic mix-up of a biased statistic would fall well below)."""
    rng = np.random.default_rng(0)
    d, n = 4, 200
    m = rng.normal(size=(d, d)) / np.sqrt(d)
    mu_a, cov_a = np.full(d, 0.3), m @ m.T + 0.5 * np.eye(d)
    mu_b, cov_b = np.full(d, 0.6), 1.5 * (m @ m.T) + 0.5 * np.eye(d)
    true = (E.gaussian_frechet_distance(np.zeros(d), np.eye(d), mu_a, cov_a)
            - E.gaussian_frechet_distance(np.zeros(d), np.eye(d), mu_b, cov_b))
    covered, draws = 0, 40
    for i in range(draws):
        r = rng.normal(size=(n, d))
        a, b = rng.multivariate_normal(mu_a, cov_a, n), rng.multivariate_normal(mu_b, cov_b, n)
        est, low, high = E.frechet_difference_ci(r, a, b, num_resamples=200, seed=i)
        assert low <= est <= high
        assert est == pytest.approx(E.feature_frechet_distance(r, a)
                                    - E.feature_frechet_distance(r, b))
        covered += low <= true <= high
    assert covered >= 34, f"covered the true difference in {covered} of {draws} draws"


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="feature sizes"):
        E.feature_frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        E.feature_frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --- precision / recall ------------------------------------------------------------------------


def test_precision_recall_identical_sets():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert E.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 8))
    fake = rng.normal(size=(120, 8)) + 100.0
    assert E.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed_1d():
    """Real {0, 1, 2, 3}, k = 1: every radius is 1. Fake {0.5, 5, -1, 3.9}: 0.5 (|0.5-0|<=1),
    -1 (|-1-0| = 1 <= 1) and 3.9 are inside, 5 (2 from 3) is not: precision 3/4. Fake radii
    (k = 1): 0.5 -> 1.5 (to -1), 5 -> 1.1 (to 3.9), -1 -> 1.5, 3.9 -> 1.1; real 0 (0.5 from
    0.5), 1 (0.5), 2 (1.5 <= 1.5 from 0.5) and 3 (0.9) are covered: recall 1."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [5.0], [-1.0], [3.9]])
    np.testing.assert_allclose(E.knn_radii(fake, 1), [1.5, 1.1, 1.5, 1.1])
    p, r = E.precision_recall(real, fake, k=1)
    assert p == 0.75 and r == 1.0
    # a tight fake cluster {0.5, 0.7} (radii 0.2) lies inside the real manifold but covers
    # no real point (nearest: 1 at 0.3 > 0.2): precision 1, recall 0
    p, r = E.precision_recall(real, np.array([[0.5], [0.7]]), k=1)
    assert p == 1.0 and r == 0.0


def test_precision_recall_matches_sklearn_knn_oracle():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 5))
    fake = 0.8 * rng.normal(size=(250, 5)) + 0.7
    k = 3
    radii = NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, k]
    np.testing.assert_allclose(E.knn_radii(real, k), radii, rtol=1e-9)
    dist = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    expect_p = np.mean(np.any(dist <= radii[None], axis=1))
    fradii = NearestNeighbors(n_neighbors=k + 1).fit(fake).kneighbors(fake)[0][:, k]
    expect_r = np.mean(np.any(dist.T <= fradii[None], axis=1))
    p, r = E.precision_recall(real, fake, k=k)
    assert p == pytest.approx(expect_p) and r == pytest.approx(expect_r)
    assert 0.1 < p < 0.99 and 0.1 < r < 0.99  # a case where both are informative


def test_knn_radii_rejects_bad_k():
    with pytest.raises(ValueError, match="k=5"):
        E.knn_radii(np.zeros((5, 2)), 5)


# --- attribute labels and grids ----------------------------------------------------------------


def test_shape_attribute_labels_match_caption_words():
    for i in range(30):
        ex = D.shape_example(1, "train", i)
        labels = {k: int(v[0]) for k, v in E.shape_attribute_labels(ex).items()}
        words = ex["caption"].split()
        assert words[1] == E.SIZE_NAMES[labels["size"]]
        assert words[2] == E.COLOUR_NAMES[labels["colour"]]
        assert words[3] == D.SHAPE_KINDS[labels["kind"]]
        assert E.COLOUR_NAMES[labels["background_colour"]] in words[5:]
        assert labels["background"] == ex["background"]
    assert E.COLOUR_NAMES == ("red", "orange", "yellow", "green", "cyan", "blue", "purple",
                              "pink")
    with pytest.raises(ValueError, match="hue"):
        E.shape_attribute_labels({"kind": 1})


def test_save_grid_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(7, 5, 6, 3)).astype(np.float32)
    images[0, 0, 0] = [-1.0, 0.0, 1.0]
    path = tmp_path / "sub" / "grid.png"
    grid = E.save_grid(images, path, nrow=3, padding=2, pad_value=255)
    back = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(back, grid)
    assert back.shape == (3 * (5 + 2) + 2, 3 * (6 + 2) + 2, 3)
    expect = np.clip(np.round((images.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    for i in range(7):
        r, c = divmod(i, 3)
        y, x = 2 + r * 7, 2 + c * 8
        np.testing.assert_array_equal(back[y:y + 5, x:x + 6], expect[i])
    np.testing.assert_array_equal(back[2, 2], [0, 128, 255])
    assert np.all(back[:2] == 255) and np.all(back[:, :2] == 255)
    assert np.all(back[2 + 2 * 7:, 2 + 1 * 8:] == 255)  # the two empty cells of the last row
    with pytest.raises(ValueError, match="nrow"):
        E.save_grid(images, tmp_path / "x.png", nrow=0)


# --- classifier --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xla_default
def test_attribute_classifier_held_out_accuracy():
    """Trained on 1000 rendered shapes (400 steps), tested on 300 held-out ones (the test
    split): colour and background are mostly read right, shape kind and size (whose bins cut
    a continuous size) clearly above chance."""
    x_train, y_train = E.render_shapes(1000, seed=0, split="train")
    x_test, y_test = E.render_shapes(300, seed=0, split="test")
    clf = E.train_attribute_classifier(x_train, y_train, jax.random.key(0), steps=400,
                                       batch_size=64, widths=(16, 32, 64), progress=False)
    acc = E.attribute_accuracy(clf, x_test, y_test)
    print("held-out attribute accuracy:", {k: round(v, 3) for k, v in acc.items()})
    chance = {k: 1.0 / n for k, n in E.SHAPE_ATTRIBUTES.items()}
    assert acc["colour"] > 0.8 and acc["background"] > 0.85
    assert acc["background_colour"] > 0.8
    assert acc["kind"] > 1.75 * chance["kind"] and acc["size"] > 1.5 * chance["size"]
    # shuffled labels: accuracy falls to about chance
    perm = np.random.default_rng(0).permutation(300)
    shuffled = E.attribute_accuracy(clf, x_test, {"colour": y_test["colour"][perm]})
    assert shuffled["colour"] < 0.4
    feats = E.features(clf, x_test)
    assert feats.shape == (300, 128) and np.all(np.isfinite(feats))
    # real test images are closer (feature Frechet distance) to real training images than
    # images of pure noise are
    noise = np.random.default_rng(1).uniform(-1, 1, x_test.shape).astype(np.float32)
    d_real = E.feature_frechet_distance(E.features(clf, x_train[:300]), feats)
    d_noise = E.feature_frechet_distance(E.features(clf, noise), feats)
    assert d_real < 0.2 * d_noise
    with pytest.raises(ValueError, match="unknown heads"):
        E.attribute_accuracy(clf, x_test, {"hue": y_test["colour"]})
