"""realchords experiment: the smoke preset end to end through the CLI (report.md with every
section, the plots, listening examples as MIDI and WAV), and the paper preset validates."""

import json

import numpy as np
import pytest

from tests.helpers import SHARED_RUN_TIMEOUT, shared_smoke_run

pytest.importorskip("music21")


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_realchords_smoke_writes_the_report_plots_and_examples(tmp_path_factory):
    run_dir = shared_smoke_run("realchords", tmp_path_factory).path
    report = (run_dir / "report.md").read_text()
    for section in ("## Table 1", "## Does RL + distillation beat online MLE?", "## Reward models",
                    "## Adaptation to a mid-song transposition", "## Listening examples"):
        assert section in report, section
    for model in ("online MLE", "offline MLE", "data", "kd", "c+d", "realchords"):
        assert f"| {model} |" in report, model
    assert (run_dir / "plots" / "adaptation.png").stat().st_size > 0
    assert (run_dir / "plots" / "rl_reward_model.png").stat().st_size > 0
    examples = run_dir / "examples"
    for kind in ("mid", "wav", "png"):
        assert list(examples.glob(f"*_realchords.{kind}")), kind
    ev = json.loads((run_dir / "seed0" / "eval.json").read_text())
    for name, row in ev["table"].items():
        assert 0 <= row["note_in_chord"] <= 100 and np.isfinite(row["onset_emd"]), name
    assert ev["table"]["data"]["onset_emd"] == pytest.approx(0.0)
    assert set(ev["auroc"]) == {"contrastive", "contrastive-multiscale", "discriminative",
                                "discriminative-multiscale"}
    rows = [json.loads(line) for line in (run_dir / "seed0" / "rl-realchords" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kl"]) for r in rows)


def test_realchords_paper_preset_validates_and_bad_values_are_named():
    from experiments import realchords as rc
    from trainkit.config import ConfigError, apply_overrides

    cfg = rc.paper()
    assert cfg.models.model().paper() == cfg.models.model()
    assert cfg.rl.beta == 0.5 and cfg.rl.lr == 1e-4 and cfg.rl.reward_scale == 50
    with pytest.raises(ConfigError, match="grid.methods"):
        apply_overrides(rc.smoke(), ["grid.methods=kd,nope"])
    with pytest.raises(ConfigError, match="eval"):
        apply_overrides(rc.smoke(), ["eval.frames=64"])
