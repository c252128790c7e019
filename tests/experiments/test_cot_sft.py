"""cot_sft end to end through the CLI (smoke preset) and its presets' validation."""

import json

import pytest

from tests.helpers import run_cli

pytest.importorskip("transformers")


@pytest.mark.slow
def test_cot_sft_smoke_trains_every_trace_set_and_reports(tmp_path, subprocess_env):
    run_dir = tmp_path / "cot"
    res = run_cli(["run", "cot_sft", "--preset", "smoke", "--run-dir", str(run_dir)], subprocess_env)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    sets = ("H", "G", "W", "P", "F2", "F4")
    assert set(results["sets"]) == set(sets)
    assert results["sets"]["W"]["correct_frac"] == 0.0 and results["sets"]["F4"]["correct_frac"] == 0.0
    for name in ("H", "G", "P", "F2"):
        assert results["sets"][name]["correct_frac"] == 1.0
    runs = results["runs"]
    assert len(runs) == 2 * len(sets)
    budget = 1000
    for row in runs.values():  # every set trained on the same completion-token budget
        assert budget <= row["completion_tokens"] < budget + 200
    report = (run_dir / "report.md").read_text()
    for section in ("## Trace sets", "## W vs H", "## P vs H", "## Accuracy vs flaw level",
                    "## Perplexity vs gain"):
        assert section in report
    for plot in ("accuracy_small_in.png", "accuracy_vs_flaw_level.png", "gain_vs_perplexity.png"):
        assert (run_dir / "plots" / plot).is_file()


def test_cot_sft_presets_validate_and_bad_values_are_named():
    from experiments import cot_sft
    from trainkit.config import ConfigError

    paper = cot_sft.paper()
    assert paper.models.small_dir and paper.data.task == "gsm8k" and paper.data.jsonl
    assert cot_sft.cpu().trace_sets == cot_sft.TRACE_SETS
    with pytest.raises(ConfigError, match="trace_sets"):
        cot_sft.CotSFTConfig(trace_sets=("H", "X"))
    with pytest.raises(ConfigError, match="trace_sets"):
        cot_sft.CotSFTConfig(trace_sets=("H", "F1"), data=paper.data)
    with pytest.raises(ConfigError, match="small_dir"):
        cot_sft.ModelsConfig(small_dir="a")
