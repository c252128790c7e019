"""Front end against references: librosa (mel filterbank, log-mel), numpy and torch (STFT),
scipy (resampling), closed forms (triangle filters, tones, sines), and soundfile round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings, strategies as st

from audio import frontend as fe
from trainkit.config import ConfigError

librosa = pytest.importorskip("librosa")  # test-only dependency
torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=12, deadline=None)


# --- mel filterbank -------------------------------------------------------------------------


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax,scale,norm", [
    (16000, 512, 64, 50.0, 8000.0, "slaney", "slaney"),
    (48000, 1024, 64, 50.0, 14000.0, "slaney", "slaney"),   # FLAM
    (22050, 2048, 128, 0.0, 11025.0, "slaney", "none"),
    (16000, 400, 80, 0.0, 8000.0, "htk", "none"),           # HTK / Kaldi-like
    (8000, 256, 23, 20.0, 3900.0, "htk", "slaney"),
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax, scale, norm):
    ours = fe.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, scale, norm)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                              htk=scale == "htk", norm="slaney" if norm == "slaney" else None,
                              dtype=np.float64).T
    assert ours.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_mel_scales_closed_forms():
    # Slaney: linear, 200/3 Hz per mel, up to 1 kHz = 15 mel; then 27 mels per factor 6.4.
    np.testing.assert_allclose(fe.hz_to_mel([0.0, 500.0, 1000.0, 6400.0], "slaney"),
                               [0.0, 7.5, 15.0, 42.0], rtol=1e-12)
    # HTK: 2595 log10(1 + f / 700); 1000 Hz is ~1000 mel.
    np.testing.assert_allclose(fe.hz_to_mel(700.0, "htk"), 2595 * np.log10(2.0), rtol=1e-12)
    f = np.array([0.0, 37.0, 999.0, 1000.0, 1001.0, 7777.0, 20000.0])
    for scale in ("slaney", "htk"):
        np.testing.assert_allclose(fe.mel_to_hz(fe.hz_to_mel(f, scale), scale), f, atol=1e-9)


def test_filters_are_triangles_on_mel_spaced_centres():
    sr, n_fft, n_mels, fmin, fmax = 16000, 2048, 20, 100.0, 7000.0
    fb = fe.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, "htk", "none")
    points = fe.mel_frequencies(n_mels + 2, fmin, fmax, "htk")
    mels = fe.hz_to_mel(points, "htk")
    np.testing.assert_allclose(np.diff(mels), np.diff(mels)[0], rtol=1e-9)  # equal mel spacing
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    for m in range(n_mels):
        lo, c, hi = points[m], points[m + 1], points[m + 2]
        w = fb[:, m]
        assert np.all(w[(freqs <= lo) | (freqs >= hi)] == 0.0)
        rising = (freqs > lo) & (freqs <= c)
        falling = (freqs > c) & (freqs < hi)
        np.testing.assert_allclose(w[rising], (freqs[rising] - lo) / (c - lo), rtol=1e-9)
        np.testing.assert_allclose(w[falling], (hi - freqs[falling]) / (hi - c), rtol=1e-9)
        assert w.max() <= 1.0 and abs(freqs[np.argmax(w)] - c) <= sr / n_fft
    # Without norm, adjacent triangles overlap so the rows sum to 1 between the 1st and last
    # centre (partition of unity).
    inner = (freqs >= points[1]) & (freqs <= points[-2])
    np.testing.assert_allclose(fb[inner].sum(axis=1), 1.0, rtol=1e-9)


def test_slaney_norm_gives_unit_area():
    sr, n_fft = 16000, 8192  # fine bins, so the Riemann sum approximates the integral
    fb = fe.mel_filterbank(sr, n_fft, 40, 0.0, 8000.0, "slaney", "slaney")
    area = fb.sum(axis=0) * (sr / n_fft)
    np.testing.assert_allclose(area[5:], 1.0, rtol=0.02)


# --- STFT -----------------------------------------------------------------------------------


def _np_stft(x, n_fft, hop, win_length, pad_mode):
    pad = n_fft // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode=pad_mode)
    n = 1 + (xp.shape[-1] - n_fft) // hop
    w = np.zeros(n_fft)
    lpad = (n_fft - win_length) // 2
    w[lpad:lpad + win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    frames = np.stack([xp[..., t * hop:t * hop + n_fft] for t in range(n)], axis=-2)
    return np.fft.rfft(frames * w, axis=-1)


@given(st.integers(300, 3000), st.sampled_from([(256, 64, 256), (512, 160, 400), (400, 100, 400)]),
       st.sampled_from(["reflect", "constant"]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_stft_matches_numpy_framing(n, fft_hop_win, pad_mode, seed):
    n_fft, hop, win = fft_hop_win
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (2, n)).astype(np.float32)
    ours = np.asarray(fe.stft(x, n_fft, hop, win, pad_mode=pad_mode))
    ref = _np_stft(x.astype(np.float64), n_fft, hop, win, pad_mode)
    assert ours.shape == ref.shape == (2, 1 + n // hop, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("n_fft,hop,win,pad_mode", [(512, 160, 512, "reflect"),
                                                   (1024, 480, 1024, "reflect"),
                                                   (400, 160, 300, "constant")])
def test_stft_matches_torch(n_fft, hop, win, pad_mode):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 4801)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda v: fe.stft(v, n_fft, hop, win, pad_mode=pad_mode))(x))
    ref = torch.stft(torch.from_numpy(x).double(), n_fft, hop, win,
                     window=torch.hann_window(win, dtype=torch.float64), center=True,
                     pad_mode=pad_mode, return_complex=True).numpy()
    np.testing.assert_allclose(ours, np.swapaxes(ref, -1, -2), atol=1e-5)


def test_stft_uncentred_and_errors():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    ours = np.asarray(fe.stft(x, 256, 100, center=False))
    assert ours.shape == (1 + (1000 - 256) // 100, 129)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)
    np.testing.assert_allclose(ours[3], np.fft.rfft(x[300:556] * w), atol=1e-4)
    with pytest.raises(ValueError, match="reflect"):
        fe.stft(x[:100], 256, 64)
    with pytest.raises(ValueError, match="pad_mode"):
        fe.stft(x, 256, 64, pad_mode="wrap")


# --- log-mel --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sed_16k", "flam"])
def test_log_mel_matches_librosa(preset):
    cfg = getattr(fe.FrontendConfig, preset)()
    x = np.random.default_rng(3).uniform(-0.5, 0.5, (2, cfg.sample_rate // 2)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda v: fe.log_mel(v, cfg))(x))
    s = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=cfg.sample_rate,
                                       n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels,
                                       fmin=cfg.fmin, fmax=cfg.fmax, pad_mode="reflect",
                                       power=2.0, htk=False, norm="slaney")
    ref = np.swapaxes(librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=None), -1, -2)
    assert ours.shape == ref.shape == (2, fe.n_frames(x.shape[-1], cfg), cfg.n_mels)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_top_db_clips_per_example():
    s = jnp.array([[[1.0, 1e-3], [1e-9, 1e-2]], [[1e-4, 1e-5], [1e-6, 1e-12]]])
    db = np.asarray(fe.power_to_db(s, top_db=40.0))
    np.testing.assert_allclose(db[0], [[0.0, -30.0], [-40.0, -20.0]], atol=1e-5)
    np.testing.assert_allclose(db[1], [[-40.0, -50.0], [-60.0, -80.0]], atol=1e-5)


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_pure_tone_lands_in_its_mel_band(scale):
    cfg = fe.FrontendConfig(sample_rate=16000, n_fft=1024, hop=256, n_mels=40, fmin=0.0,
                            fmax=8000.0, mel_scale=scale)
    centres = fe.mel_frequencies(cfg.n_mels + 2, cfg.fmin, cfg.fmax, scale)[1:-1]
    t = np.arange(16000) / 16000
    for band in (3, 12, 25, 36):
        x = 0.5 * np.sin(2 * np.pi * centres[band] * t).astype(np.float32)
        lm = np.asarray(fe.log_mel(x, cfg))
        assert int(np.argmax(lm[4:-4].mean(axis=0))) == band


def test_log_mel_batched_equals_per_example_and_jit():
    cfg = fe.FrontendConfig.tiny()
    x = np.random.default_rng(4).standard_normal((3, 2, 1600)).astype(np.float32)
    batched = np.asarray(jax.jit(lambda v: fe.log_mel(v, cfg))(x))
    single = np.stack([np.stack([np.asarray(fe.log_mel(x[i, j], cfg)) for j in range(2)])
                       for i in range(3)])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert batched.shape == (3, 2, 21, 16)


# --- resampling -----------------------------------------------------------------------------


@given(st.sampled_from([(48000, 16000), (16000, 48000), (44100, 16000), (22050, 16000),
                        (8000, 11025), (32000, 24000)]),
       st.integers(50, 2000), st.integers(0, 2**31 - 1))
@SETTINGS
def test_resample_matches_scipy_resample_poly(rates, n, seed):
    import scipy.signal

    orig, new = rates
    x = np.random.default_rng(seed).uniform(-1, 1, (2, n)).astype(np.float32)
    g = np.gcd(orig, new)
    ref = scipy.signal.resample_poly(x.astype(np.float64), new // g, orig // g, axis=-1)
    ours = np.asarray(fe.resample(x, orig, new))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("orig,new,freq", [(44100, 16000, 440.0), (16000, 48000, 1234.5),
                                           (48000, 16000, 5000.0), (22050, 32000, 3000.0)])
def test_resampled_sine_keeps_frequency_and_amplitude(orig, new, freq):
    amp, phase = 0.7, 0.3
    x = amp * np.sin(2 * np.pi * freq * np.arange(orig) / orig + phase)
    y = np.asarray(jax.jit(lambda v: fe.resample(v, orig, new))(x.astype(np.float32)))
    assert y.shape == (new,)
    t = np.arange(new) / new
    keep = slice(new // 10, -new // 10)  # away from the zero-padded edges
    # Least-squares fit of a sine at the original frequency: it explains the output exactly.
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)[keep]
    coef, *_ = np.linalg.lstsq(basis, y[keep].astype(np.float64), rcond=None)
    assert abs(np.hypot(*coef) - amp) < 2e-3
    assert abs(np.arctan2(coef[1], coef[0]) - phase) < 2e-3
    resid = y[keep] - basis @ coef
    assert np.sqrt(np.mean(resid ** 2)) < 1e-3 * amp
    # The spectral peak sits at freq.
    spec = np.abs(np.fft.rfft(y[keep] * np.hanning(len(resid))))
    peak_hz = np.argmax(spec) * new / len(resid)
    assert abs(peak_hz - freq) <= new / len(resid)


def test_resample_removes_content_above_new_nyquist():
    x = np.sin(2 * np.pi * 10000.0 * np.arange(48000) / 48000).astype(np.float32)
    y = np.asarray(fe.resample(x, 48000, 16000))  # 10 kHz > 8 kHz Nyquist: must vanish
    assert np.max(np.abs(y[2000:-2000])) < 2e-2


def test_resample_identity_and_bad_rates():
    x = jnp.arange(10.0)
    assert fe.resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="polyphase"):
        fe.resample(x, 44100, 44099)
    with pytest.raises(ValueError, match="positive integers"):
        fe.resample(x, 0, 16000)


# --- config ---------------------------------------------------------------------------------


def test_frontend_config_presets_and_validation():
    flam = fe.FrontendConfig.flam()
    assert (flam.sample_rate, flam.n_fft, flam.hop, flam.n_mels, flam.fmin, flam.fmax) == (
        48000, 1024, 480, 64, 50.0, 14000.0)
    assert fe.n_frames(480000, flam) == 1001  # 10 s at 100 frames/s (+1 centred frame)
    fe.FrontendConfig.sed_16k(), fe.FrontendConfig.panns_32k(), fe.FrontendConfig.tiny()
    with pytest.raises(ConfigError, match="fmax"):
        fe.FrontendConfig(sample_rate=16000, fmax=9000.0)
    with pytest.raises(ConfigError, match="fmin"):
        fe.FrontendConfig(fmin=8000.0, fmax=8000.0)
    with pytest.raises(ConfigError, match="mel_scale"):
        fe.FrontendConfig(mel_scale="bark")
    with pytest.raises(ConfigError, match="win_length"):
        fe.FrontendConfig(n_fft=256, win_length=512)


# --- files ----------------------------------------------------------------------------------


def test_wav_and_flac_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    stereo = rng.uniform(-0.9, 0.9, (2, 8000)).astype(np.float32)
    fe.write_audio(tmp_path / "a.wav", stereo, 16000)
    got, sr = fe.read_audio(tmp_path / "a.wav", mono=False)
    assert sr == 16000 and got.dtype == np.float32
    np.testing.assert_array_equal(got, stereo)  # 32-bit float WAV is lossless
    mono, _ = fe.read_audio(tmp_path / "a.wav")
    np.testing.assert_allclose(mono, stereo.mean(axis=0), atol=1e-7)
    fe.write_audio(tmp_path / "b.flac", stereo[0], 16000)
    got, sr = fe.read_audio(tmp_path / "b.flac")
    assert sr == 16000
    np.testing.assert_allclose(got, stereo[0], atol=2.0 ** -23)  # 24-bit PCM
    # Reading with a target rate resamples.
    got, sr = fe.read_audio(tmp_path / "b.flac", sample_rate=48000)
    assert sr == 48000 and got.shape == (24000,)


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(ValueError, match="garbage.wav.*cannot read"):
        fe.read_audio(bad)
    with pytest.raises(ValueError, match="missing.flac"):
        fe.read_audio(tmp_path / "missing.flac")
    odd = tmp_path / "odd_rate.wav"
    sf.write(odd, np.zeros(100, np.float32), 12345)
    with pytest.raises(ValueError, match=r"odd_rate.wav: unsupported sample rate 12345"):
        fe.read_audio(odd)
    with pytest.raises(ValueError, match=r"clip.mp3: unsupported audio format"):
        fe.read_audio(tmp_path / "clip.mp3")
    with pytest.raises(ValueError, match=r"out.wav: unsupported sample rate 12345"):
        fe.write_audio(tmp_path / "out.wav", np.zeros(10), 12345)
    with pytest.raises(ValueError, match=r"out.wav: samples must be"):
        fe.write_audio(tmp_path / "out.wav", np.zeros((2, 2, 2)), 16000)
