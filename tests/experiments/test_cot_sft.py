"""cot_sft end to end through the CLI (smoke preset) and its presets' validation."""

import json

import pytest

from tests.helpers import SHARED_RUN_TIMEOUT, shared_smoke_run

pytest.importorskip("transformers")


@pytest.mark.timeout(SHARED_RUN_TIMEOUT)
@pytest.mark.slow
def test_cot_sft_smoke_trains_every_trace_set_and_reports(tmp_path_factory):
    run_dir = shared_smoke_run("cot_sft", tmp_path_factory).path
    results = json.loads((run_dir / "results.json").read_text())
    sets = ("H", "G", "W", "P", "F2", "F4")
    assert set(results["sets"]) == set(sets)
    assert results["sets"]["W"]["correct_frac"] == 0.0 and results["sets"]["F4"]["correct_frac"] == 0.0
    for name in ("H", "G", "P", "F2"):
        assert results["sets"][name]["correct_frac"] == 1.0
    runs = results["runs"]
    assert len(runs) == len(sets)  # smoke trains the small student only
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
    with pytest.raises(ConfigError, match="students"):
        cot_sft.CotSFTConfig(students=("medium",))


def test_base_corpus_answers_only_short_problems_and_never_an_eval_prompt():
    """The cpu design: the base sees direct answers to problems of <= base_answer_ops operators
    only (plus data.num_pretrain equation facts), so in-domain (2-operator) accuracy must come
    from the traces; no evaluation prompt is in any training pool."""
    from experiments import cot_sft
    from llm_rl.tasks import ANSWER_MARK

    data = cot_sft.DataConfig(min_ops=2, max_ops=2, ood_ops=3, num_pretrain=90, base_answer_ops=1,
                              num_teacher=20, num_train=20, num_eval=20)
    cfg = cot_sft.CotSFTConfig(data=data)
    pretrain, teacher, train, eval_in, eval_ood = cot_sft._problems(cfg)
    assert pretrain and all(p.solution.count("=") == 1 for p in pretrain)  # one step: one operator
    corpus = cot_sft.base_examples(cfg, pretrain)
    qa = [(q, a) for q, a in corpus if q]
    facts = [a for q, a in corpus if not q]
    assert len(facts) == data.num_pretrain and all(a.startswith(ANSWER_MARK) for _, a in qa)
    evals = {p.prompt for p in eval_in + eval_ood}
    assert not evals & {q for q, _ in qa} and not evals & {p.prompt for p in train + teacher}
    assert all(p.solution.count("=") == 2 for p in train + eval_in)


def test_summarize_per_seed_slope_correlation_and_pairing_on_a_hand_made_result():
    """Accuracy = 0.5 - 0.1 * level + 0.01 * seed, perplexity rising with level: the per-seed
    slope is exactly -0.1 (CI 0), the per-seed Spearman -1, and runs are paired by seed even
    when stored out of order."""
    import numpy as np

    from experiments import cot_sft

    sets = ("H", "F1", "F2", "F3", "F4")
    runs = {}
    for seed in (2, 0, 1):  # out of order on purpose
        for level, name in enumerate(sets):
            acc = 0.5 - 0.1 * level + 0.01 * seed
            runs[f"small-{name}-s{seed}"] = {"size": "small", "set": name, "seed": seed, "in": acc, "ood": acc}
    results = {"runs": runs, "sets": {n: {} for n in sets}, "base": {"small": {"in": 0.05, "ood": 0.0}},
               "nll": {"small": {n: 1.0 + level for level, n in enumerate(sets)}}}
    s = cot_sft.summarize(results)
    assert s["acc"][("small", "H", "in")][2] == [0.5, 0.51, 0.52]
    mean, ci, n = s["flaw_slope"][("small", "in")]
    assert n == 3 and np.isclose(mean, -0.1) and np.isclose(ci, 0.0, atol=1e-9)
    c = s["corr"][("small", "in")]
    assert np.isclose(c["spearman_seeds"][0], -1.0) and np.isclose(c["pearson_seeds"][0], -1.0)
    assert np.isclose(c["gain"][0], 0.51 - 0.05)
    assert cot_sft._diff(s, "small", "F4", "H", "in") == "-0.400 ± 0.000"
