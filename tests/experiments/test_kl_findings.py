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


def test_staleness_verdict_follows_the_intervals(tmp_path):
    run = _fake_run(tmp_path, {"none": [_final(0.30, 20.0), _final(0.34, 22.0), _final(0.32, 21.0)],
                               "k1-reward": [_final(0.50, 8.0), _final(0.52, 7.0), _final(0.54, 9.0)],
                               "k3-loss": [_final(0.31, 5.0), _final(0.35, 6.0), _final(0.30, 7.0)]})
    text = _staleness_findings(run, ("none", "k1-reward", "k3-loss"), staleness=4)
    # k1-reward - none = +0.200, Welch interval (scipy ttest_ind equal_var=False): [0.155, 0.245]
    assert "k1-reward: in-domain accuracy +0.200 [+0.155, +0.245] (above 0) vs `none`: more accurate" in text
    assert "KL to the reference 8.00 vs 21.00" in text
    assert "k3-loss: in-domain accuracy +0.000" in text and "not distinguishable from `none`" in text


def test_findings_compare_configurations_pair_by_pair_not_pooled(tmp_path):
    """One collapsed biased arm must not carry the verdict: k3-loss ties k1-reward (interval
    contains 0) while k1-loss collapses (unbiased better), and the base model was better than
    every arm, which the findings must say instead of 'consistent with the paper'."""
    run = _fake_run(tmp_path, {"k1-reward": [_final(0.60, 3.0), _final(0.62, 3.5), _final(0.58, 3.2)],
                               "k3-loss": [_final(0.61, 2.9), _final(0.66, 2.8), _final(0.59, 3.0)],
                               "k1-loss": [_final(0.00, 270.0), _final(0.02, 280.0), _final(0.01, 276.0)]})
    (tmp_path / "base_eval.json").write_text(json.dumps({"eval_accuracy": 0.95, "ood_accuracy": 0.06}))
    text = _findings(run, ("k1-reward", "k1-loss", "k3-loss"))
    assert "- k1-reward - k1-loss: in-domain +0.590 [" in text and "(above 0)" in text
    assert "- k1-reward - k3-loss: in-domain -0.020 [" in text and "(contains 0)" in text
    assert "more accurate in 1, less accurate in 0, unresolved (interval contains 0) in 1" in text
    assert "in every configuration" in text and "consistent with the paper" not in text


def test_findings_say_what_is_missing_instead_of_printing_nan(tmp_path):
    run = _fake_run(tmp_path, {"none": [_final(0.3, 20.0)], "k1-reward": [_final(0.5, 8.0)]})
    text = _findings(run, ("none", "k1-reward", "k3-loss"))  # k3-loss never finished
    assert "nan" not in text and "finished here: none, k1-reward" in text
    stale = _staleness_findings(run, ("k1-reward",), staleness=2)
    assert "Needs finished runs of `none`" in stale


def test_final_accuracy_is_the_last_evaluation_not_a_mean_of_evaluations(tmp_path):
    """Evaluations are logged every eval_every iterations: the final accuracy is the last one
    (0.234 here), not the mean over the last 5 rows holding it (0.203 = mean of all three)."""
    from experiments.kl_estimators import _final, _final_values

    rows = [{"step": s, "reward": 0.5} for s in range(1, 151)]
    for s, acc in ((50, 0.328), (100, 0.047), (150, 0.234)):
        rows[s - 1].update(eval_accuracy=acc, ood_accuracy=acc / 2)
    assert _final(rows)["eval_accuracy"] == 0.234 and _final(rows)["ood_accuracy"] == 0.117
    d = tmp_path / "configs" / "none-s0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"final": {"eval_accuracy": 0.203}}))
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _final_values(RunDir(tmp_path), ["none"], "eval_accuracy") == [0.234]
