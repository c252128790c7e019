"""audio.sed: A-weighting against the IEC 61672-1 table, frame labels exact on constructed
mixtures, the frame grid against the front end, overlap and split guarantees of the simulator,
determinism, speech plumbing (a fake espeak-ng), and the tfds/grain round trip."""

import dataclasses
import math
import os
import stat
import sys

import numpy as np
import pytest

from audio import frontend as fe
from audio import sed
from trainkit.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:espeak-ng is not installed")


def _cfg(**kw):
    """16 kHz, 10 ms hop, 10 frames per label -> label frames of 1600 samples."""
    base = dict(frontend=fe.FrontendConfig.sed_16k(), downsample=10, duration=2.0,
                label_rel_db=-20.0, label_floor_db=-80.0)
    base.update(kw)
    return sed.SimConfig(**base)


def _tone(freq, n, sr, amp=1.0):
    return amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)


# --- A-weighting -------------------------------------------------------------------------------

# IEC 61672-1:2013 Table 3 (A-weighting, dB, nominal frequencies; the table rounds to 0.1 dB
# at the exact base-10 frequencies 10^(n/10) * 1000, which we use).
IEC_TABLE = [(-15, -39.4), (-12, -26.2), (-10, -19.1), (-9, -16.1), (-6, -8.6), (-3, -3.2),
             (0, 0.0), (3, 1.2), (6, 1.0), (9, -1.1), (10, -2.5), (12, -6.6)]


@pytest.mark.parametrize("band,expected", IEC_TABLE)
def test_a_weighting_matches_iec_table(band, expected):
    f = 1000.0 * 10 ** (band / 10)
    assert abs(sed.a_weighting_db(f) - expected) < 0.1, f


def test_a_weighting_named_points_and_dc():
    a = sed.a_weighting_db([100.0, 1000.0, 10000.0, 0.0])
    np.testing.assert_allclose(a[:3], [-19.1, 0.0, -2.5], atol=0.1)
    assert a[3] == -np.inf
    np.testing.assert_allclose(sed.a_weighting_gain(1000.0), 1.0, atol=1e-4)


@pytest.mark.parametrize("freq,a_db", [(1000.0, 0.0), (100.0, -19.1), (10000.0, -2.5)])
def test_frame_levels_of_a_full_scale_sine(freq, a_db):
    # 100 ms frames (at 32 kHz, so 10 kHz is below Nyquist) hold a whole number of cycles
    # of these tones: the frame's A-weighted mean square is exactly (1/2) R_A(f)^2, i.e.
    # -3.01 dB + A(f).
    cfg = _cfg(frontend=fe.FrontendConfig.panns_32k())
    x = _tone(freq, cfg.num_samples, 32000)
    levels = sed.frame_a_levels(x, cfg)
    inner = levels[1:-1]  # the first/last frames run off the clip (centred grid)
    np.testing.assert_allclose(inner, 10 * math.log10(0.5) + float(sed.a_weighting_db(freq)),
                               atol=0.01)
    # whole-signal level: same value (Parseval) up to leakage from the fast FFT padding
    assert abs(sed.a_weighted_level(x, 32000) - (-3.0103 + sed.a_weighting_db(freq))) < 0.05


# --- frame grid ----------------------------------------------------------------------------


@pytest.mark.parametrize("fcfg,d,dur", [(fe.FrontendConfig.sed_16k(), 10, 2.0),
                                        (fe.FrontendConfig.tiny(), 4, 1.3),
                                        (fe.FrontendConfig(center=False), 3, 1.0),
                                        (fe.FrontendConfig.sed_16k(), 1, 0.5)])
def test_frame_grid_matches_the_front_end(fcfg, d, dur):
    import jax

    cfg = sed.SimConfig(frontend=fcfg, downsample=d, duration=dur)
    n = cfg.num_samples
    stft_frames = jax.eval_shape(lambda x: fe.log_mel(x, fcfg),
                                 jax.ShapeDtypeStruct((n,), np.float32)).shape[0]
    assert cfg.num_frames == stft_frames // d
    start, end = sed.frame_bounds(n, cfg)
    assert np.all(start[1:] == end[:-1])  # contiguous
    # STFT frame t (centre c_t) belongs to label frame t // d
    offset = 0 if fcfg.center else fcfg.n_fft // 2
    for t in range(cfg.num_frames * d):
        c = t * fcfg.hop + offset
        l_ = t // d
        assert start[l_] <= c < end[l_] or c >= n, (t, c, start[l_], end[l_])
    ts = sed.frame_timestamps(n, cfg)
    assert ts.shape == (cfg.num_frames + 1,) and np.all(np.diff(ts) > 0)


# --- labels on constructed mixtures --------------------------------------------------------


def test_one_tone_at_known_frames_labels_exactly_those_frames():
    cfg = _cfg()
    n, sr = cfg.num_samples, 16000
    start, end = sed.frame_bounds(n, cfg)
    a, b = 4, 11  # the tone fills frames 4..10 exactly
    tone = _tone(1000.0, end[b - 1] - start[a], sr, 0.3)
    wave, events, labels = sed.compose(cfg, [sed.Piece("high_tone", int(start[a]), tone, 0.0, 0)])
    expected = np.zeros(cfg.num_frames, bool)
    expected[a:b] = True
    np.testing.assert_array_equal(labels[0], expected)
    assert events == [sed.Event("high_tone", start[a] / sr, end[b - 1] / sr, 0.0, 0)]
    np.testing.assert_allclose(wave[start[a]:end[b - 1]], tone, atol=1e-7)
    assert np.all(wave[:start[a]] == 0) and np.all(wave[end[b - 1]:] == 0)
    # the same labels from the full-length track
    track = np.zeros(n)
    track[start[a]:end[b - 1]] = tone
    np.testing.assert_array_equal(sed.frame_labels(track, cfg), expected)


def test_partial_frames_follow_the_relative_threshold():
    # A steady tone covering a fraction q of a frame reads 10 log10(q) dB below a full frame:
    # q = 1/2 (-3 dB) is active, q = 1/200 (-23 dB) is not, with label_rel_db = -20.
    cfg = _cfg()
    n, sr = cfg.num_samples, 16000
    start, end = sed.frame_bounds(n, cfg)
    d = cfg.frame_samples
    on = int(start[5] + d // 2)          # half of frame 5
    off = int(start[9] + d // 200)       # 8 samples of frame 9
    labels = sed.piece_labels(_tone(1000.0, off - on, sr), on, n, cfg)
    expected = np.zeros(cfg.num_frames, bool)
    expected[5:9] = True
    np.testing.assert_array_equal(labels, expected)
    levels = sed.frame_a_levels(np.pad(_tone(1000.0, off - on, sr), (on, n - off)), cfg)
    assert abs(levels[5] - levels[6] - 10 * math.log10(0.5)) < 0.1
    assert -30 < levels[9] - levels[6] < -20  # about 10 log10(1/200) = -23 (phase-dependent)


def test_two_overlapping_events_are_labelled_independently():
    cfg = _cfg(max_peak=1.0)
    n, sr = cfg.num_samples, 16000
    start, end = sed.frame_bounds(n, cfg)
    loud = _tone(1000.0, end[12] - start[2], sr, 0.5)       # frames 2..12
    quiet = _tone(250.0, end[17] - start[8], sr, 0.01)      # frames 8..17, 34 dB quieter
    pieces = [sed.Piece("high_tone", int(start[2]), loud, 0.0, 0),
              sed.Piece("low_tone", int(start[8]), quiet, -30.0, 1)]
    wave, events, labels = sed.compose(cfg, pieces)
    exp_loud = np.zeros(cfg.num_frames, bool)
    exp_loud[2:13] = True
    exp_quiet = np.zeros(cfg.num_frames, bool)
    exp_quiet[8:18] = True
    assert [e.label for e in events] == ["high_tone", "low_tone"]
    np.testing.assert_array_equal(labels, np.stack([exp_loud, exp_quiet]))
    np.testing.assert_allclose(wave, np.pad(loud, (start[2], n - end[12]))
                               + np.pad(quiet, (start[8], n - end[17])), atol=1e-6)
    by_class = sed.class_labels(events, labels, ["low_tone", "high_tone", "siren"])
    np.testing.assert_array_equal(by_class, np.stack([exp_quiet, exp_loud,
                                                      np.zeros(cfg.num_frames, bool)]))
    # a floor above the quiet tone's level (-48 dB FS re A) removes its labels only
    _, _, floored = sed.compose(dataclasses.replace(cfg, label_floor_db=-40.0), pieces)
    np.testing.assert_array_equal(floored, np.stack([exp_loud, np.zeros_like(exp_quiet)]))


def test_peak_scaling_is_recorded_in_gains():
    cfg = _cfg(max_peak=0.5)
    tone = _tone(1000.0, 3200, 16000, 1.0)
    wave, events, _ = sed.compose(cfg, [sed.Piece("high_tone", 0, tone, 3.0, 0)])
    assert abs(np.max(np.abs(wave)) - 0.5) < 1e-3
    assert abs(events[0].gain_db - (3.0 + 20 * math.log10(0.5))) < 1e-9


# --- simulator guarantees ------------------------------------------------------------------


def _max_overlap_from_events(events):
    """Most sources sounding at once, from the event intervals (sweep)."""
    points = sorted([(e.onset, 1, e.source) for e in events] + [(e.offset, -1, e.source)
                                                                  for e in events],
                    key=lambda p: (p[0], p[1]))
    active, best = 0, 0
    for _, delta, _ in points:
        active += delta
        best = max(best, active)
    return best


def test_never_more_than_max_overlap_sources():
    # Crowded: up to 10 events of up to seconds in a 3 s clip, so the cap binds.
    cfg = sed.SimConfig(duration=3.0, min_events=8, max_events=10, p_background=0.0)
    reached = 0
    for i in range(12):
        m = sed.simulate(np.random.default_rng(i), cfg, classes=sed.available_classes("seen"))
        assert _max_overlap_from_events(m.events) <= 3
        sources = {e.source for e in m.events}
        per_source = np.stack([np.any([row for e, row in zip(m.events, m.event_labels)
                                       if e.source == s], axis=0) for s in sources])
        frame_count = per_source.sum(axis=0)
        assert frame_count.max() <= 3
        reached = max(reached, frame_count.max())
        assert cfg.min_events - 3 <= len(sources) <= cfg.max_events  # drops are rare
    assert reached == 3  # the constraint was active


def test_event_counts_pieces_and_texts_are_consistent():
    cfg = sed.SimConfig.tiny()
    for i in range(15):
        m = sed.example(cfg, 0, "test_seen", i)
        n_src = len({e.source for e in m.events})
        assert 1 <= n_src <= cfg.max_events
        assert m.event_labels.shape == (len(m.events), cfg.num_frames)
        assert m.waveform.shape == (cfg.num_samples,) and m.waveform.dtype == np.float32
        assert np.max(np.abs(m.waveform)) <= cfg.max_peak + 1e-6
        for e in m.events:
            assert 0 <= e.onset < e.offset <= cfg.duration + 1e-9
        present = {e.label for e in m.events}
        assert set(m.text_classes) >= present
        assert len(m.text_classes) == len(set(m.text_classes)) == len(m.texts)
        for name, text, row in zip(m.text_classes, m.texts, m.text_labels):
            assert text in sed.all_captions(name, "all")
            if name in present:
                union = np.any([r for e, r in zip(m.events, m.event_labels) if e.label == name],
                               axis=0)
                np.testing.assert_array_equal(row, union)
                assert row.any()
            else:
                assert not row.any()
        assert len(m.text_classes) - len(present) == min(cfg.num_negatives,
                                                         len(sed.available_classes("seen"))
                                                         - len(present))


def test_gain_is_the_a_weighted_level_of_a_single_event():
    cfg = dataclasses.replace(sed.SimConfig.tiny(), min_events=1, max_events=1, fade_max=0.0,
                              p_fragment=0.0, p_repeat=0.0, p_background=0.0)
    for i in range(6):
        m = sed.simulate(np.random.default_rng(i), cfg, classes=["low_tone", "pink_noise",
                                                                   "rising_chirp"])
        (e,) = m.events
        a, b = round(e.onset * 8000), round(e.offset * 8000)
        level = sed.a_weighted_level(m.waveform[a:b].astype(np.float64), 8000)
        assert abs(level - (cfg.event_level_db + e.gain_db)) < 0.01


def test_fragments_and_repetitions_happen():
    cfg = dataclasses.replace(sed.SimConfig(duration=6.0), p_fragment=0.5, p_repeat=0.5)
    multi = 0
    for i in range(6):
        m = sed.simulate(np.random.default_rng(i), cfg, classes=["high_tone", "click_train"])
        by_source = {}
        for e in m.events:
            by_source.setdefault(e.source, []).append(e)
        for evs in by_source.values():
            assert len(evs) <= cfg.max_pieces
            multi += len(evs) > 1
            for a, b in zip(evs, evs[1:]):  # pieces of a source are disjoint, in order
                assert a.offset <= b.onset and a.label == b.label and a.gain_db == b.gain_db
    assert multi > 0


def test_determinism_per_seed():
    cfg = sed.SimConfig.tiny()
    a, b = sed.example(cfg, 3, "train", 5), sed.example(cfg, 3, "train", 5)
    np.testing.assert_array_equal(a.waveform, b.waveform)
    assert a.events == b.events and a.texts == b.texts
    np.testing.assert_array_equal(a.text_labels, b.text_labels)
    c, d = sed.example(cfg, 4, "train", 5), sed.example(cfg, 3, "test_seen", 5)
    assert not np.array_equal(a.waveform, c.waveform)
    assert not np.array_equal(a.waveform, d.waveform)


def test_heldout_classes_and_phrasings_never_appear_in_train():
    cfg = sed.SimConfig.tiny()
    heldout = set(sed.HELDOUT_CLASSES)
    novel_texts = {t for n in sed.CLASSES for t in sed.all_captions(n, "all")} - {
        t for n in sed.CLASSES for t in sed.all_captions(n, "seen")}
    for i in range(40):
        m = sed.example(cfg, 0, "train", i)
        assert not heldout & {e.label for e in m.events}
        assert not heldout & set(m.text_classes)
        assert not novel_texts & set(m.texts) and not m.text_novel.any()
    seen_novel = 0
    for i in range(20):
        m = sed.example(cfg, 0, "test_heldout", i)
        assert {e.label for e in m.events} <= heldout and set(m.text_classes) <= heldout
        m = sed.example(cfg, 0, "test_seen", i)
        assert not heldout & ({e.label for e in m.events} | set(m.text_classes))
        seen_novel += int(m.text_novel.sum())
    assert seen_novel > 0  # test splits do use the held-out phrasings
    for i in range(5):  # valid: seen classes only, and other clips than every test split's
        m = sed.example(cfg, 0, "valid", i)
        assert not heldout & ({e.label for e in m.events} | set(m.text_classes))
        for split in ("train", "test_seen", "test_heldout"):
            assert not np.array_equal(m.waveform, sed.example(cfg, 0, split, i).waveform)
    assert len(sed.CLASSES) >= 12 and len(sed.HELDOUT_CLASSES) >= 3


def _dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    return np.argmax(spec) * sr / x.shape[0]


@pytest.mark.parametrize("name", [n for n in sed.CLASSES if n != "speech"])
def test_every_class_synthesizes_a_finite_nonsilent_sound(name):
    for seed in range(3):
        x = sed.CLASSES[name].synth(np.random.default_rng(seed), 0.8, 16000)
        assert x.ndim == 1 and 0 < x.shape[0] <= 12800 and np.all(np.isfinite(x))
        assert np.sqrt(np.mean(x ** 2)) > 1e-3


def test_tone_and_chirp_frequencies():
    sr = 16000
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert 145 <= _dominant_freq(sed.low_tone(rng, 1.0, sr), sr) <= 405
        assert 1490 <= _dominant_freq(sed.high_tone(rng, 1.0, sr), sr) <= 4010
        up = sed.rising_chirp(rng, 1.0, sr)
        down = sed.falling_chirp(rng, 1.0, sr)
        q = sr // 4
        assert _dominant_freq(up[-q:], sr) > 2 * _dominant_freq(up[:q], sr)
        assert _dominant_freq(down[:q], sr) > 2 * _dominant_freq(down[-q:], sr)


# --- speech (espeak-ng) ----------------------------------------------------------------------


def test_speech_is_left_out_cleanly_without_espeak(monkeypatch):
    monkeypatch.setattr(sed.shutil, "which", lambda name: None)
    assert not sed.speech_available()
    assert "speech" not in sed.available_classes("all")
    assert "speech" not in sed.available_classes("seen")
    with pytest.raises(RuntimeError, match="espeak-ng"):
        sed.speech(np.random.default_rng(0), 1.0, 16000)


def test_speech_plumbing_with_a_fake_espeak(tmp_path, monkeypatch):
    # A stand-in espeak-ng: writes 0.5 s of a 22.05 kHz tone to the -w path, logging its args.
    script = tmp_path / "espeak-ng"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, numpy as np, soundfile as sf\n"
        "args = sys.argv[1:]\n"
        "open(sys.argv[0] + '.log', 'w').write(repr(args))\n"
        "path = args[args.index('-w') + 1]\n"
        "t = np.arange(11025) / 22050\n"
        "x = np.concatenate([np.zeros(500), 0.5 * np.sin(2 * np.pi * 300 * t), np.zeros(500)])\n"
        "sf.write(path, x, 22050, subtype='FLOAT')\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert sed.speech_available() and "speech" in sed.available_classes("seen")
    x = sed.speech(np.random.default_rng(0), 2.0, 16000)
    # 0.5 s once the silence is trimmed (give or take the resampling filter's ringing)
    assert abs(x.shape[0] - 8000) <= 40
    assert abs(_dominant_freq(x, 16000) - 300) < 5
    args = eval((tmp_path / "espeak-ng.log").read_text())
    assert args[0] == "-v" and "-s" in args and "-p" in args and len(args[-1].split()) >= 2
    short = sed.speech(np.random.default_rng(0), 0.2, 16000)
    assert short.shape[0] == 3200  # cut to the requested duration


@pytest.mark.skipif(not sed.speech_available(), reason="espeak-ng is not installed")
def test_real_espeak_speech():
    x = sed.speech(np.random.default_rng(0), 2.0, 16000)
    assert 0 < x.shape[0] <= 32000 and np.sqrt(np.mean(x ** 2)) > 1e-3


# --- config ----------------------------------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="min_events"):
        sed.SimConfig(min_events=5, max_events=2)
    with pytest.raises(ConfigError, match="max_overlap"):
        sed.SimConfig(max_overlap=0)
    with pytest.raises(ConfigError, match="p_repeat"):
        sed.SimConfig(p_fragment=0.7, p_repeat=0.7)
    with pytest.raises(ConfigError, match="duration"):
        sed.SimConfig(duration=0.05)
    with pytest.raises(ValueError, match="unknown sound class"):
        sed.simulate(np.random.default_rng(0), sed.SimConfig.tiny(), classes=["dog"])
    with pytest.raises(ValueError, match="unknown split"):
        sed.example(sed.SimConfig.tiny(), 0, "dev", 0)


# --- tfds data set -----------------------------------------------------------------------------

N_TRAIN, N_VALID, N_TEST, SEED = 6, 2, 3, 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sed_data")
    sed.build(root, N_TRAIN, N_TEST, seed=SEED, cfg=sed.SimConfig.tiny(), num_valid=N_VALID)
    return root


def test_build_and_read_round_trip(data_dir):
    cfg = sed.SimConfig.tiny()
    for split, count in (("train", N_TRAIN), ("valid", N_VALID), ("test_seen", N_TEST),
                         ("test_heldout", N_TEST)):
        got = sorted(sed.iterate_examples(split, data_dir), key=lambda r: r["index"])
        assert [int(r["index"]) for r in got] == list(range(count))
        for rec in got:
            m = sed.example(cfg, SEED, split, int(rec["index"]))
            np.testing.assert_allclose(rec["waveform"], m.waveform, atol=1.0 / 32767 + 1e-7)
            k, e = len(m.texts), len(m.events)
            assert list(rec["texts"][:k]) == m.texts and list(rec["texts"][k:]) == [""] * (
                cfg.max_texts - k)
            assert list(rec["text_classes"][:k]) == m.text_classes
            np.testing.assert_array_equal(rec["text_mask"], np.arange(cfg.max_texts) < k)
            np.testing.assert_array_equal(rec["text_labels"][:k], m.text_labels)
            assert not rec["text_labels"][k:].any()
            np.testing.assert_array_equal(rec["event_labels"][:e], m.event_labels)
            assert list(rec["event_classes"][:e]) == [ev.label for ev in m.events]
            np.testing.assert_allclose(rec["event_onset"][:e], [ev.onset for ev in m.events],
                                       rtol=1e-6)
            np.testing.assert_array_equal(rec["event_source"][:e], [ev.source for ev in m.events])
            assert rec["background"] == m.background


def test_float32_storage_is_exact(tmp_path):
    cfg = sed.SimConfig.tiny()
    sed.build(tmp_path, 2, 1, seed=1, cfg=cfg, audio_dtype="float32")
    for rec in sed.iterate_examples("train", tmp_path):
        m = sed.example(cfg, 1, "train", int(rec["index"]))
        np.testing.assert_array_equal(rec["waveform"], m.waveform)


def test_grain_batches_shuffle_and_resume(data_dir):
    cfg = sed.SimConfig.tiny()
    it = sed.load("train", data_dir, batch_size=2, seed=3, num_epochs=1)
    batches = list(it)
    assert len(batches) == N_TRAIN // 2
    b = batches[0]
    assert b["waveform"].shape == (2, cfg.num_samples)
    assert b["text_labels"].shape == (2, cfg.max_texts, cfg.num_frames)
    assert b["event_labels"].shape == (2, cfg.max_segments, cfg.num_frames)
    order = [int(i) for bb in batches for i in bb["index"]]
    assert sorted(order) == list(range(N_TRAIN))
    again = [int(i) for bb in sed.load("train", data_dir, batch_size=2, seed=3, num_epochs=1)
             for i in bb["index"]]
    assert again == order
    other = [int(i) for bb in sed.load("train", data_dir, batch_size=2, seed=4, num_epochs=1)
             for i in bb["index"]]
    assert other != order or N_TRAIN < 3
    it = sed.load("train", data_dir, batch_size=2, seed=3)
    next(it)
    state = it.get_state()
    want = next(it)
    it2 = sed.load("train", data_dir, batch_size=2, seed=3)
    it2.set_state(state)
    got = next(it2)
    np.testing.assert_array_equal(got["waveform"], want["waveform"])
    np.testing.assert_array_equal(got["index"], want["index"])


def test_cross_labels_extend_each_clips_labels_to_the_whole_batch(data_dir):
    cfg = sed.SimConfig.tiny()
    b = next(sed.load("test_seen", data_dir, batch_size=3, seed=0))
    texts = b["text_classes"].reshape(-1)
    labels = sed.cross_labels(b["event_classes"], b["event_labels"], b["event_mask"], texts)
    k0 = cfg.max_texts
    assert labels.shape == (3, 3 * k0, cfg.num_frames)
    for i in range(3):
        # a clip against its own texts: its stored labels
        np.testing.assert_array_equal(labels[i, i * k0:(i + 1) * k0], b["text_labels"][i])
        # against another clip's text: the union of this clip's events of that class
        events = [sed.Event(c, 0.0, 1.0, 0.0, 0) for c, m in
                  zip(b["event_classes"][i], b["event_mask"][i]) if m]
        rows = b["event_labels"][i][b["event_mask"][i]]
        np.testing.assert_array_equal(labels[i], sed.class_labels(events, rows, list(texts)))
    assert not labels[:, np.asarray(texts) == ""].any()


def test_missing_build_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build"):
        sed.load("train", tmp_path)
    with pytest.raises(ValueError, match="audio_dtype"):
        sed.build(tmp_path, 1, 1, audio_dtype="int8")
