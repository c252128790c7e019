"""realchords: online chord accompaniment with RL, reward models and teacher distillation
(Wu et al., "Adaptive Accompaniment with ReaLchords", ICML 2024; reference re-implementation
lukewys/realchords-pytorch, MIT), on the Bach chorales music21 ships.

Per seed, each stage a resumable sub-run under ``seed<S>/<stage>/`` (:func:`trainkit.loop.fit`):

1. ``online``: the online decoder by MLE on interleaved [BOS, c_0, m_0, ...] (Table 1 "Online MLE");
2. ``teacher``: the offline encoder-decoder by MLE ("Offline MLE");
3. ``contrastive`` / ``discriminative``: the reward models, on crops of every multi-scale
   window length; their AUROC (real vs mismatched pairings, held-out pieces) is reported;
4. ``rl-<method>`` for each of ``grid.methods`` (:data:`audio.music.rl.METHODS`): ``kd``
   (KL to the teacher, no reward model), ``c``, ``d``, ``c+d`` (reward models, KL to the
   online MLE model), ``realchords`` (C+D + KL to the teacher) and ``realchords-m`` (the same
   with multi-scale rewards), all from the online MLE model, beta = ``rl.beta``, all with the
   penalties (held chord, silence, early EOS).

Evaluation on the held-out pieces (first ``eval.frames`` frames): chords sampled at
temperature 1 along each melody (online models play every frame: EOS masked), Table-1 metrics
from :mod:`audio.music.metrics`: note-in-chord ratio (%), onset-interval EMD against the
held-out data (x1e3) and chord-length entropy; the data's own row. The adaptation test
transposes each held-out melody by ``eval.shift`` semitones from its middle frame on and plots
the per-frame note-in-chord of online MLE and ReaLchords around the shift. Listening examples:
for ``eval.examples`` held-out melodies, the data, online MLE and ReaLchords (streamed with
:class:`audio.music.stream.Accompanist`) as MIDI, WAV and piano-roll PNG under ``examples/``.

Run: ``python -m experiments run realchords --preset cpu --seeds 3``.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.registry import Experiment, RunContext, RunResult, UserError
from trainkit import plots
from trainkit.config import Config, field, load_json
from trainkit.loop import LoopSettings, fit
from trainkit.run import RunDir, is_main_process, read_json, read_metrics, write_json
from trainkit.sharding import local_replica, make_mesh, replicate

RL_METHODS = ("kd", "c", "d", "c+d", "realchords", "realchords-m")

# Table 1 of the paper (note-in-chord %, onset-interval EMD x1e3, chord-length entropy);
# None where the issue does not quote a value.
PAPER_TABLE1 = {
    "online MLE": (36.99, 14.23, 2.21), "kd": (46.38, None, None),
    "realchords": (48.17, 16.09, 1.35), "realchords-m": (54.29, 17.17, 1.66),
    "offline MLE": (63.73, 9.85, 1.90), "data": (70.94, 0.0, 2.19),
}


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    corpus: str = field("chorales", help="music21 collection(s) for audio.music.data.load_corpus: "
                                             "chorales, nottingham, or both joined by +")
    limit: int | None = field(None, ge=4, help="use only the first N pieces (None: all)")
    held_out: float = field(0.2, gt=0, lt=1, help="fraction of pieces held out (split by piece)")
    transpose: int = field(6, ge=0, le=6, help="training transpositions -k..k semitones")


@dataclasses.dataclass(frozen=True)
class ModelsConfig(Config):
    width: int = field(64, ge=8)
    num_heads: int = field(4, ge=1)
    head_dim: int = field(16, ge=1)
    num_layers: int = field(2, ge=1)
    mlp_dim: int = field(128, ge=8)
    reward_layers: int = field(1, ge=1)
    embed_dim: int = field(32, ge=2)
    frames: int = field(64, ge=8, help="max frames per piece (paper 256)")

    def model(self):
        from audio.music.models import ModelConfig
        return ModelConfig(width=self.width, num_heads=self.num_heads, head_dim=self.head_dim,
                           num_layers=self.num_layers, mlp_dim=self.mlp_dim, max_frames=self.frames)

    def reward(self):
        from audio.music.rewards import RewardConfig
        return RewardConfig(width=self.width, num_heads=self.num_heads, head_dim=self.head_dim,
                            num_layers=self.reward_layers, mlp_dim=self.mlp_dim,
                            embed_dim=self.embed_dim, max_frames=self.frames)


@dataclasses.dataclass(frozen=True)
class PretrainConfig(Config):
    online_steps: int = field(300, ge=1)
    teacher_steps: int = field(300, ge=1)
    reward_steps: int = field(200, ge=1)
    batch: int = field(32, ge=2)
    lr: float = field(1e-3, gt=0, le=1)
    chunk_size: int = field(100, ge=1)


@dataclasses.dataclass(frozen=True)
class RLConfig(Config):
    steps: int = field(100, ge=1)
    batch: int = field(16, ge=2)
    lr: float = field(1e-4, gt=0, le=1, help="policy learning rate (paper 1e-4)")
    value_lr: float = field(1e-3, gt=0, le=1)
    beta: float = field(0.5, ge=0, help="KL coefficient (paper 0.5)")
    reward_scale: float = field(50.0, gt=0, help="reward-model scale (paper 50)")
    temperature: float = field(1.0, gt=0)
    normalize_advantages: bool = field(True, help="whiten advantages over the batch")
    chunk_size: int = field(25, ge=1)


@dataclasses.dataclass(frozen=True)
class GridConfig(Config):
    methods: tuple[str, ...] = field(RL_METHODS, help="any of: " + ", ".join(RL_METHODS))

    def validate(self):
        for m in self.methods:
            if m not in RL_METHODS:
                raise self.invalid("methods", "each must be one of " + ", ".join(RL_METHODS))
        if "realchords" not in self.methods:
            raise self.invalid("methods", "must include realchords (the report compares it)")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    pieces: int = field(64, ge=1, help="held-out pieces evaluated (at most)")
    frames: int = field(64, ge=8, help="frames per evaluated piece (<= models.frames)")
    shift: int = field(6, ge=1, le=11, help="semitones of the mid-song transposition")
    examples: int = field(2, ge=0, help="listening examples written")
    auroc_pieces: int = field(64, ge=2)


@dataclasses.dataclass(frozen=True)
class RealchordsConfig(Config):
    seed: int = field(0, ge=0)
    data: DataConfig = field(factory=DataConfig)
    models: ModelsConfig = field(factory=ModelsConfig)
    pretrain: PretrainConfig = field(factory=PretrainConfig)
    rl: RLConfig = field(factory=RLConfig)
    grid: GridConfig = field(factory=GridConfig)
    eval: EvalConfig = field(factory=EvalConfig)

    def validate(self):
        if self.eval.frames > self.models.frames:
            raise self.invalid("eval", f"eval.frames={self.eval.frames} exceeds models.frames="
                                       f"{self.models.frames}")


def smoke() -> RealchordsConfig:
    return RealchordsConfig(
        data=DataConfig(limit=12, held_out=0.25, transpose=1),
        models=ModelsConfig(width=32, num_heads=2, head_dim=16, num_layers=1, mlp_dim=64,
                            embed_dim=16, frames=16),
        pretrain=PretrainConfig(online_steps=4, teacher_steps=4, reward_steps=4, batch=8,
                                chunk_size=4),
        rl=RLConfig(steps=2, batch=4, chunk_size=2),
        grid=GridConfig(methods=("kd", "c+d", "realchords")),  # c, d: the same compiled step
        eval=EvalConfig(pieces=3, frames=16, examples=1, auroc_pieces=3))


def cpu() -> RealchordsConfig:
    """Laptop scale (measured 70-90 minutes per seed, one process per seed, on a shared 2-core
    machine at load 5-18; docs/realchords_results.md): 2-layer 64-wide models, 64-frame
    (4-bar) crops, all chorales, +-6 transpositions, 100 RL steps per method at lr 3e-4 (the
    paper's 1e-4 is for 1000 steps); run with ``--seeds 3``."""
    return RealchordsConfig(rl=RLConfig(lr=3e-4))


def paper() -> RealchordsConfig:
    """The paper's sizes (T5 v1.1 small: 8 layers, 6 heads of 64, d 512), 256 frames, RL lr
    1e-4 and beta 0.5; steps chosen for an accelerator."""
    return RealchordsConfig(
        models=ModelsConfig(width=512, num_heads=6, head_dim=64, num_layers=8, mlp_dim=1024,
                            reward_layers=8, embed_dim=512, frames=256),
        pretrain=PretrainConfig(online_steps=11000, teacher_steps=10000, reward_steps=8000,
                                batch=64, lr=1e-3, chunk_size=500),
        rl=RLConfig(steps=1000, batch=64, lr=1e-4, value_lr=1e-4, chunk_size=50),
        eval=EvalConfig(pieces=512, frames=256, examples=4, auroc_pieces=256))


# --- running ---------------------------------------------------------------------------------


def _stage(sub: RunDir, state, chunk, steps: int, chunk_size: int, desc: str, resume: bool):
    loop = LoopSettings(num_steps=steps, chunk_size=chunk_size, save_every=chunk_size,
                        key_metric="loss", desc=desc)
    state, logger = fit(sub, state, chunk, loop, resume=resume)
    logger.close()
    return state


def _supervised(sub: RunDir, module, loss, opt, bank, frames: int, p: PretrainConfig, steps: int, crop_lengths,
                seed: int, desc: str, resume: bool, mesh=None):
    """Train one supervised stage; the model comes back with this process's own copy of the
    parameters (evaluation and sampling run on every process alone)."""
    from audio.music import rl

    gd, params = nnx.split(module)
    chunk = rl.make_supervised_chunk(gd, loss, opt, bank, batch=p.batch, frames=frames,
                                     crop_lengths=crop_lengths, mesh=mesh)
    state = _stage(sub, replicate(rl.init_train_state(params, opt, seed), mesh), chunk, steps,
                   p.chunk_size, desc, resume)
    return nnx.merge(gd, local_replica(state.params))


def _load_pieces(cfg: RealchordsConfig, seed: int):
    from audio.music import data

    pieces = data.load_corpus(cfg.data.corpus, limit=cfg.data.limit)
    return data.split_by_piece(pieces, held_out=cfg.data.held_out, seed=seed)


def _frames(pieces, vocab, frames: int):
    """Melody and chord frame tokens [N, frames] of the first ``frames`` frames."""
    mel = np.zeros((len(pieces), frames), np.int32)
    ch = np.zeros((len(pieces), frames), np.int32)
    for i, p in enumerate(pieces):
        n = min(len(p), frames)
        mel[i, :n] = vocab.melody_token_array(p.melody[:n], p.melody_onset[:n])
        ch[i, :n] = vocab.chord_token_array(p.chord[:n], p.chord_onset[:n])
    return mel, ch


def _auroc(models: dict, melody, chords) -> dict:
    """AUROC of each reward model (single- and multi-scale) for real vs mismatched pairings
    (chords rolled by one piece); all scores in one compiled program."""
    from audio.music import rewards as R

    split = {name: nnx.split(m) for name, m in models.items()}

    @jax.jit
    def scores(params, m, c):
        out = {}
        for name, (graphdef, _) in split.items():
            rm = nnx.merge(graphdef, params[name])
            for ms in (False, True):
                key = f"{name}{'-multiscale' if ms else ''}"
                out[key] = (R.score(rm, m, c, multiscale=ms),
                            R.score(rm, m, R.mismatched(c), multiscale=ms))
        return out

    got = scores({k: p for k, (_, p) in split.items()}, jnp.asarray(melody), jnp.asarray(chords))
    return {k: R.auroc(np.asarray(real), np.asarray(fake)) for k, (real, fake) in got.items()}


def _to_pieces(vocab, names, melody_pieces, chords: np.ndarray):
    """Pieces with the melody of ``melody_pieces`` and the generated chord tokens."""
    from audio.music import data

    out = []
    for name, p, row in zip(names, melody_pieces, np.asarray(chords)):
        n = min(len(p), row.shape[0])
        toks = np.where(vocab.is_chord(row[:n]), row[:n], vocab.chord_silence)
        chord, onset = vocab.decode_chord(toks)
        out.append(data.Piece(name, p.melody[:n], p.melody_onset[:n], chord, onset))
    return out


def _table_metrics(generated, reference) -> dict:
    from audio.music import metrics

    return {"note_in_chord": 100.0 * float(np.mean([metrics.note_in_chord_ratio(p) for p in generated])),
            "onset_emd": float(metrics.onset_interval_emd(generated, reference)),
            "chord_entropy": float(metrics.chord_length_entropy(generated))}


def _shifted(piece, semitones: int):
    """The piece with its melody transposed by ``semitones`` from the middle frame on."""
    from audio.music import data

    mid = len(piece) // 2
    up = data.transpose(piece, semitones)
    return data.Piece(piece.name, np.concatenate([piece.melody[:mid], up.melody[mid:]]),
                      piece.melody_onset, piece.chord, piece.chord_onset)


def run(cfg: RealchordsConfig, ctx: RunContext) -> RunResult:
    from audio.music import data, rl, stream
    from audio.music import models as M
    from audio.music import rewards as R

    vocab = data.Vocab()
    space = M.TokenSpace.from_vocab(vocab)
    tables = rl.DecodeTables.from_vocab(vocab)
    mcfg, rcfg = cfg.models.model(), cfg.models.reward()
    F = cfg.models.frames
    p = cfg.pretrain
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(p.lr))
    rl_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.rl.lr))
    value_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.rl.value_lr))
    scales = (F,) + R.window_scales(F)
    rl_settings = rl.RLSettings(beta=cfg.rl.beta, reward_scale=cfg.rl.reward_scale, batch=cfg.rl.batch,
                                frames=F, temperature=cfg.rl.temperature,
                                normalize_advantages=cfg.rl.normalize_advantages)
    # Several processes: every step's batch (crops, and the RL rollouts) split over all devices,
    # the state, bank and frozen models replicated; evaluation on every process alone.
    mesh = make_mesh(data=-1) if jax.process_count() > 1 else None
    uneven = [f"{k}={b}" for k, b in (("pretrain.batch", p.batch), ("rl.batch", cfg.rl.batch))
              if b % jax.device_count()]
    if mesh is not None and uneven:
        raise UserError(f"{', '.join(uneven)}: with {jax.process_count()} processes each batch is "
                        f"split over all {jax.device_count()} devices; use a multiple of that")
    results, all_params = {}, {}
    for si in range(ctx.seeds):
        seed = cfg.seed + si
        root = ctx.run_dir.path / f"seed{si}"
        train, test = _load_pieces(cfg, seed)
        shifts = tuple(range(-cfg.data.transpose, cfg.data.transpose + 1))
        bank = replicate(rl.FrameBank.build(train, vocab, shifts=shifts), mesh)
        rngs = nnx.Rngs(seed)

        def supervised(name, module, loss, steps, crop_lengths=None, seed_offset=0,
                       bank=bank, seed=seed, root=root, si=si):
            return _supervised(RunDir(root / name), module, loss, opt, bank, F, p, steps, crop_lengths,
                               seed * 100 + seed_offset, f"seed {si} {name}", ctx.resume, mesh)

        online = supervised("online", M.OnlineDecoder(mcfg, space, rngs=rngs), rl.online_mle_loss,
                            p.online_steps, seed_offset=1)
        teacher = supervised("teacher", M.OfflineTeacher(mcfg, space, rngs=rngs), rl.teacher_mle_loss,
                             p.teacher_steps, seed_offset=2)
        contrastive = supervised("contrastive", R.ContrastiveReward(rcfg, space, rngs=rngs),
                                 rl.reward_model_loss, p.reward_steps, scales, seed_offset=3)
        discriminative = supervised("discriminative", R.DiscriminativeReward(rcfg, space, rngs=rngs),
                                    rl.reward_model_loss, p.reward_steps, scales, seed_offset=4)

        # Reward-model AUROC on held-out pieces: real vs mismatched (rolled) pairings.
        aur = test[:cfg.eval.auroc_pieces]
        mel, ch = _frames(aur, vocab, F)
        auroc = _auroc({"contrastive": contrastive, "discriminative": discriminative}, mel, ch)

        frozen = rl.Frozen(*((gd, replicate(params, mesh)) for gd, params in (
            nnx.split(teacher), nnx.split(online), nnx.split(contrastive), nnx.split(discriminative))))
        value_gd, _ = nnx.split(M.ValueDecoder(mcfg, space, rngs=nnx.Rngs(0)))
        online_gd, online_params = nnx.split(online)
        policies = {"online MLE": online}
        for method in cfg.grid.methods:
            # The critic's trunk starts from the online model (as the reference's critic).
            critic = M.ValueDecoder(mcfg, space, rngs=nnx.Rngs(seed))
            critic.trunk = nnx.merge(online_gd, online_params)
            _, value_params = nnx.split(critic)
            chunk = rl.make_rl_chunk(online_gd, value_gd, rl_opt, value_opt, bank, tables, rl_settings,
                                     frozen, method, mesh=mesh)
            state = rl.init_rl_state(online_params, value_params, rl_opt, value_opt, seed * 100 + 10)
            state = _stage(RunDir(root / f"rl-{method}"), replicate(state, mesh), chunk, cfg.rl.steps,
                           cfg.rl.chunk_size, f"seed {si} rl {method}", ctx.resume)
            policies[method] = nnx.merge(online_gd, local_replica(state.params))
            all_params[f"{method}-s{si}"] = state.params

        # Table 1 on held-out pieces.
        ev = [data.crop(q, 0, cfg.eval.frames) for q in test[:cfg.eval.pieces]]
        names = [q.name for q in ev]
        mel, _ = _frames(ev, vocab, cfg.eval.frames)
        key = jax.random.key(seed * 100 + 50)
        row = {"data": _table_metrics(ev, ev)}
        for name, policy in policies.items():
            out = M.sample_online(policy, mel, key, allow_eos=False)
            row[name] = _table_metrics(_to_pieces(vocab, names, ev, out.chords), ev)
        out = M.sample_teacher(teacher, mel, key)
        row["offline MLE"] = _table_metrics(_to_pieces(vocab, names, ev, out.chords), ev)
        # Adaptation: transpose the melody mid-song; per-frame note-in-chord.
        from audio.music import metrics

        shifted = [_shifted(q, cfg.eval.shift) for q in ev]
        smel, _ = _frames(shifted, vocab, cfg.eval.frames)
        adaptation = {}
        for name in ("online MLE", "realchords"):
            out = M.sample_online(policies[name], smel, key, allow_eos=False)
            per_frame = metrics.per_frame_note_in_chord(_to_pieces(vocab, names, shifted, out.chords))
            adaptation[name] = np.asarray(per_frame, np.float64).tolist()
        if is_main_process():
            write_json(root / "eval.json", {"table": row, "auroc": auroc, "adaptation": adaptation,
                                            "eval_pieces": len(ev), "frames": cfg.eval.frames})
        results[si] = row
        if si == 0 and is_main_process():  # MIDI, audio and piano rolls: process 0 alone
            _examples(ctx.run_dir, vocab, ev[:cfg.eval.examples], policies, stream)
    metrics_out = {f"{m}/note_in_chord": float(np.mean([results[s][m]["note_in_chord"] for s in results]))
                   for m in results[0]}
    return RunResult(params=all_params, metrics=metrics_out, steps=cfg.rl.steps)


def _examples(run_dir: RunDir, vocab, pieces, policies, stream) -> None:
    from audio.music import data

    out = run_dir.path / "examples"
    out.mkdir(exist_ok=True)
    listing = []
    for i, piece in enumerate(pieces):
        versions = {"data": piece}
        for name, tag in (("online MLE", "online_mle"), ("realchords", "realchords")):
            versions[tag] = stream.accompany(policies[name], vocab, piece)
        for tag, q in versions.items():
            stem = f"example{i}_{tag}"
            data.piece_to_midi(q, out / f"{stem}.mid")
            synthesis = data.render_wav(q, out / f"{stem}.wav")
            data.piano_roll_png(q, out / f"{stem}.png")
            listing.append({"piece": piece.name, "version": tag, "stem": stem, "synthesis": synthesis})
    write_json(out / "examples.json", listing)


# --- report ----------------------------------------------------------------------------------


def _seeds(run_dir: RunDir) -> list[dict]:
    return [read_json(p) for p in sorted(run_dir.path.glob("seed*/eval.json"))]


def _mean_ci(values) -> tuple[float, float]:
    """Mean over seeds and the 95% CI half-width (trainkit.plots.mean_and_ci on [seeds, 1])."""
    mean, ci = plots.mean_and_ci(np.asarray(values, np.float64).reshape(-1, 1))
    return float(mean[0]), float(ci[0])


def _fmt(values, digits=2) -> str:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return "-"
    mean, ci = _mean_ci(v)
    return f"{float(mean):.{digits}f} ± {float(ci):.{digits}f}" if v.size > 1 else f"{float(mean):.{digits}f}"


def _paper(name: str) -> str:
    vals = PAPER_TABLE1.get(name)
    if vals is None:
        return "-"
    return " / ".join("-" if x is None else f"{x:g}" for x in vals)


def report(run_dir: RunDir) -> str:
    cfg = load_json(RealchordsConfig, run_dir.config_path)
    evals = _seeds(run_dir)
    n = len(evals)
    order = ["data", "online MLE", *cfg.grid.methods, "offline MLE"]
    rows = []
    for name in order:
        if not evals or name not in evals[0]["table"]:
            continue
        vals = {k: [e["table"][name][k] for e in evals] for k in ("note_in_chord", "onset_emd", "chord_entropy")}
        rows.append([name, _fmt(vals["note_in_chord"]), _fmt(vals["onset_emd"]),
                     _fmt(vals["chord_entropy"], 3), _paper(name)])
    table = plots.markdown_table(rows, ["model", "note-in-chord %", "onset-interval EMD x1e3",
                                        "chord-length entropy", "paper Table 1 (NiC / EMD / H)"])
    # Verdict: paired over seeds.
    lines = []
    if evals and "realchords" in evals[0]["table"]:
        for key, label, better in (("note_in_chord", "note-in-chord", "higher"),
                                   ("onset_emd", "onset-interval EMD", "lower"),
                                   ("chord_entropy", "chord-length entropy", None)):
            diff = np.asarray([e["table"]["realchords"][key] - e["table"]["online MLE"][key] for e in evals])
            mean, ci = _mean_ci(diff)
            if better is None:
                verdict = "(no better direction; the data's value is the target)"
            elif n < 2:
                verdict = "one seed only: no interval, no verdict"
            else:
                good = mean > ci if better == "higher" else mean < -ci
                bad = mean < -ci if better == "higher" else mean > ci
                verdict = ("ReaLchords is better (interval excludes 0)" if good else
                           "ReaLchords is worse (interval excludes 0)" if bad else
                           "no clear difference (interval includes 0)")
            lines.append(f"- {label}: ReaLchords - online MLE = {mean:+.2f} ± {ci:.2f} ({better or 'n/a'} "
                         f"is better) over {n} seed(s): {verdict}.")
        nic = np.asarray([e["table"]["realchords"]["note_in_chord"] - e["table"]["online MLE"]["note_in_chord"]
                          for e in evals])
        m, c = _mean_ci(nic)
        plain = ("**Yes**: RL + distillation beats online MLE on note-in-chord" if n >= 2 and m > c else
                 "**No**: RL + distillation does not beat online MLE on note-in-chord" if n >= 2 and m < -c else
                 "**Not shown**: the note-in-chord difference is within the seed interval"
                 if n >= 2 else "**Not decided**: one seed only")
        lines.insert(0, f"{plain} at this scale ({n} seed(s), mean ± 95% CI of the per-seed difference).")
    # AUROC
    au_rows = []
    if evals:
        for k in evals[0]["auroc"]:
            au_rows.append([k, _fmt([e["auroc"][k] for e in evals], 3)])
    au_table = plots.markdown_table(au_rows, ["reward model", "AUROC real vs mismatched (held-out)"])
    # Plots: adaptation and RL curves.
    figs = []
    if evals:
        curves = {}
        frames = len(evals[0]["adaptation"]["online MLE"])
        mid = frames // 2
        steps = list(range(-mid, frames - mid))
        for name in ("online MLE", "realchords"):
            vals = np.asarray([e["adaptation"][name] for e in evals], np.float64)
            curves[name] = (steps, vals)
        figs.append(plots.learning_curves(run_dir.plots_dir / "adaptation.png", curves,
                                          xlabel="frame relative to the transposition",
                                          ylabel="note-in-chord (per frame)",
                                          title=f"melody transposed by {cfg.eval.shift} semitones mid-song"))
        after = {name: float(np.nanmean(np.asarray([e["adaptation"][name] for e in evals])[:, mid:]))
                 for name in ("online MLE", "realchords")}
        adapt_line = (f"Mean per-frame note-in-chord after the shift: online MLE {after['online MLE']:.3f}, "
                      f"ReaLchords {after['realchords']:.3f}.")
    else:
        adapt_line = "No evaluation found."
    for key, ylabel in (("reward_model", "reward-model score (unscaled)"), ("kl", "KL(pi || anchor) per sequence"),
                        ("return", "mean return")):
        curves = {}
        for method in cfg.grid.methods:
            series = []
            for sub in sorted(run_dir.path.glob(f"seed*/rl-{method}")):
                rows_m = [r for r in read_metrics(sub / "metrics.jsonl") if key in r]
                series.append(([r["step"] for r in rows_m], [r[key] for r in rows_m]))
            if series and series[0][0] and all(s[0] == series[0][0] for s in series):
                curves[method] = (series[0][0], np.asarray([s[1] for s in series], np.float64))
        if curves:
            figs.append(plots.learning_curves(run_dir.plots_dir / f"rl_{key}.png", curves, xlabel="RL step",
                                              ylabel=ylabel, title=f"RL: {key}"))
    ex = run_dir.path / "examples" / "examples.json"
    ex_lines = []
    if ex.exists():
        for e in json.loads(ex.read_text()):
            ex_lines.append(f"- {e['piece']} — {e['version']}: [MIDI](examples/{e['stem']}.mid), "
                            f"[WAV](examples/{e['stem']}.wav) ({e['synthesis']}), "
                            f"![piano roll](examples/{e['stem']}.png)")
    m = cfg.models
    text = (
        "# realchords\n\n"
        f"Online chord accompaniment on music21's {cfg.data.corpus} (split by piece, held-out "
        f"fraction {cfg.data.held_out}); models {m.num_layers} layer(s), width {m.width}, "
        f"{m.num_heads} heads of {m.head_dim}, {m.frames}-frame crops; pretraining "
        f"{cfg.pretrain.online_steps}/{cfg.pretrain.teacher_steps}/{cfg.pretrain.reward_steps} steps "
        f"(online/teacher/each reward model); RL {cfg.rl.steps} steps of {cfg.rl.batch} rollouts, "
        f"lr {cfg.rl.lr}, beta {cfg.rl.beta}, reward scale {cfg.rl.reward_scale}. Evaluation: "
        f"{evals[0]['eval_pieces'] if evals else 0} held-out pieces, first {cfg.eval.frames} frames, chords sampled "
        f"at temperature 1; mean ± 95% CI over {n} seed(s).\n\n"
        "## Table 1\n\n" + table + "\n\n"
        "## Does RL + distillation beat online MLE?\n\n" + "\n".join(lines) + "\n\n"
        "## Reward models\n\n" + au_table + "\n\n"
        "## Adaptation to a mid-song transposition\n\n" + adapt_line + "\n\n"
        + "\n".join(f"![{f.stem}]({f.relative_to(run_dir.path)})" for f in figs) + "\n\n"
        "## Listening examples\n\n" + ("\n".join(ex_lines) or "none") + "\n")
    run_dir.report_path.write_text(text)
    return str(run_dir.report_path)


EXPERIMENT = Experiment(
    name="realchords",
    description="ReaLchords: online chord accompaniment, RL with contrastive/discriminative "
                "rewards and offline-teacher distillation, on music21's Bach chorales (ICML 2024)",
    config_cls=RealchordsConfig,
    presets={"smoke": smoke, "cpu": cpu, "paper": paper},
    run=run,
    report=report,
)
