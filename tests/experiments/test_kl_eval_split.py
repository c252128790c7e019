"""kl_estimators: the evaluation problems are disjoint from every RL prompt (all seeds and
iterations of the run) and from the pretraining problems, and distinct among themselves."""


import numpy as np
import pytest

pytest.importorskip("tokenizers")

from experiments import kl_estimators as K, lm_pretrain  # noqa: E402
from llm_rl import tasks  # noqa: E402
from llm_rl.rl import RLSettings, sample_problems  # noqa: E402


def _rl_prompts(cfg, seeds):
    r = cfg.rl
    prompts = set()
    for seed in range(cfg.seed, cfg.seed + seeds):
        s = RLSettings(num_prompts=r.num_prompts, task="arithmetic", seed=seed,
                       task_kwargs=(("max_ops", r.max_ops), ("max_value", r.max_value)))
        for step in range(r.iterations):
            prompts.update(p.prompt for p in sample_problems(s, step))
    return prompts


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_eval_problems_are_not_training_prompts(preset):
    cfg = K.EXPERIMENT.preset(preset)
    seeds = 3
    in_domain, ood = K.evaluation_problems(cfg, seeds)
    eval_prompts = [p.prompt for p in in_domain + ood]
    assert len(in_domain) == len(ood) == cfg.rl.eval_problems
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(eval_prompts) & _rl_prompts(cfg, seeds)
    train, held_out = lm_pretrain.pretrain_problems(cfg.base.pretrain)
    assert not set(eval_prompts) & {p.prompt for p in train + held_out}
    assert all(p.prompt.count("+") + p.prompt.count("-") + p.prompt.count("*") >= 1
               for p in in_domain)


def test_the_old_eval_stream_leaked_an_rl_batch():
    # what the test above guards against: the eval draw used default_rng([seed, 99]), the
    # stream of RL iteration 99's prompts
    cfg = K.EXPERIMENT.preset("cpu")
    r = cfg.rl
    old = [tasks.arithmetic_problem(np.random.default_rng([cfg.seed, 99]), max_ops=r.max_ops,
                                    max_value=r.max_value)]
    assert old[0].prompt in _rl_prompts(cfg, 1)
