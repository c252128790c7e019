"""The kl_estimators report's verdicts, on run directories built by hand (no training)."""

import json

from experiments.kl_estimators import _findings, _staleness_findings
from trainkit.run import RunDir


def _fake_run(tmp_path, finals: dict[str, list[dict]]) -> RunDir:
    for name, seeds in finals.items():
        for s, final in enumerate(seeds):
            d = tmp_path / "configs" / f"{name}-s{s}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"final": final}))
    return RunDir(tmp_path)


def _final(acc, kl):
    return {"eval_accuracy": acc, "ood_accuracy": 0.0, "reward": acc, "kl_k3": kl, "grad_norm": 1.0}


def test_staleness_verdict_follows_the_numbers(tmp_path):
    run = _fake_run(tmp_path, {"none": [_final(0.30, 20.0), _final(0.34, 22.0), _final(0.32, 21.0)],
                               "k1-reward": [_final(0.50, 8.0), _final(0.52, 7.0), _final(0.54, 9.0)],
                               "k3-loss": [_final(0.31, 5.0), _final(0.35, 6.0), _final(0.30, 7.0)]})
    text = _staleness_findings(run, ("none", "k1-reward", "k3-loss"), staleness=4)
    assert "k1-reward: in-domain accuracy +0.200 vs `none`" in text
    assert "more accurate than `none`, beyond 2 standard errors; KL to the reference 8.00 vs 21.00" in text
    assert "k3-loss: in-domain accuracy +0.000 vs `none`" in text and "within 2 standard errors" in text


def test_findings_say_what_is_missing_instead_of_printing_nan(tmp_path):
    run = _fake_run(tmp_path, {"none": [_final(0.3, 20.0)], "k1-reward": [_final(0.5, 8.0)]})
    text = _findings(run, ("none", "k1-reward", "k3-loss"))  # k3-loss never finished
    assert "nan" not in text and "finished here: none, k1-reward" in text
    stale = _staleness_findings(run, ("k1-reward",), staleness=2)
    assert "Needs finished runs of `none`" in stale
