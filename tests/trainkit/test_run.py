import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainkit import plots
from trainkit.run import MetricsLogger, RunDir, RunDirError, final_metrics, params_sha256, read_metrics


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    run = RunDir(tmp_path / "r")
    logger = MetricsLogger(run)
    logger.log_stacked(1, {"loss": np.array([[3.0, 4.0], [1.0, 2.0], [0.5, 0.5]])},
                       last_extra={"eval": np.array([9.0, 8.0])})
    logger.close()
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == [3.0, 4.0] and rows[2]["eval"] == [9.0, 8.0] and "eval" not in rows[0]
    assert any(p.name.startswith("events") for p in run.tb_dir.iterdir())


def test_log_every_keeps_multiples_and_chunk_end(tmp_path):
    run = RunDir(tmp_path / "r")
    logger = MetricsLogger(run, tensorboard=False)
    logger.log_stacked(1, {"loss": np.arange(7.0)}, every=3)
    logger.close()
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [3, 6, 7]


def test_resume_drops_rows_after_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    logger = MetricsLogger(run, tensorboard=False)
    logger.log_stacked(1, {"loss": np.arange(10.0)})
    logger.close()
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 11, "loss"')  # torn last line from a killed run
    assert len(read_metrics(run.metrics_path)) == 10
    logger = MetricsLogger(run, resume_step=6, tensorboard=False)
    logger.log(7, {"loss": 70.0})
    logger.close()
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7] and rows[-1]["loss"] == 70.0


def test_corrupt_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl: line 2"):
        read_metrics(path)


def test_final_metrics_uses_last_values():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": [1.0, 2.0], "eval": 5.0}]
    assert final_metrics(rows) == {"loss": 1.5, "eval": 5.0}


def test_params_sha256_is_stable_and_sensitive():
    tree = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2), jnp.bfloat16)}, "k": jax.random.key(0)}
    same = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2), jnp.bfloat16)}, "k": jax.random.key(0)}
    assert params_sha256(tree) == params_sha256(same)
    for changed in ({**tree, "a": tree["a"].at[3].set(3.0000002)},
                    {**tree, "a": tree["a"].astype(jnp.float16)},
                    {**tree, "a": tree["a"].reshape(2, 2)},
                    {**tree, "k": jax.random.key(1)},
                    {"x": tree["a"], "b": tree["b"], "k": tree["k"]}):
        assert params_sha256(changed) != params_sha256(tree)


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="cannot write"):
        RunDir(tmp_path / "file" / "run")
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir(tmp_path / "missing", must_exist=True)


def test_mean_and_ci_matches_student_t():
    mean, ci = plots.mean_and_ci(np.array([[0.0, 1.0], [2.0, 1.0]]))
    np.testing.assert_allclose(mean, [1.0, 1.0])
    # n=2: sem = std(ddof=1)/sqrt(2) = 1 for the first column; t(0.975, 1) = 12.706.
    np.testing.assert_allclose(ci, [12.706, 0.0], rtol=1e-4)
    mean, ci = plots.mean_and_ci(np.array([1.0, 2.0]))
    np.testing.assert_allclose(ci, [0.0, 0.0])


def test_mean_and_ci_leaves_out_nan_per_column():
    """Column 0: no finite seed -> NaN mean; column 1: one finite seed -> its value, no
    interval; column 2: seeds 0, 2, 4 -> mean 2, sem 2/sqrt(3), t(0.975, 2) = 4.303."""
    nan = np.nan
    values = np.array([[nan, nan, 0.0], [nan, 5.0, nan], [nan, nan, 2.0], [nan, nan, 4.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" / "Degrees of freedom"
        mean, ci = plots.mean_and_ci(values)
    assert np.isnan(mean[0]) and ci[0] == 0.0
    np.testing.assert_allclose(mean[1:], [5.0, 2.0])
    np.testing.assert_allclose(ci[1:], [0.0, 4.303 * 2.0 / np.sqrt(3.0)], rtol=1e-4)  # t to 4 digits


def test_plots_write_png(tmp_path):
    steps = np.arange(10)
    p = plots.learning_curves(tmp_path / "a.png", {"x": (steps, np.random.rand(3, 10)),
                                                    "y": (steps, np.random.rand(10))}, logy=True)
    q = plots.bar_chart(tmp_path / "b.png", ["a", "b"], [1.0, 2.0], errors=[0.1, 0.2])
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = plots.markdown_table([["a", 1.23456], ["b", 2]], ["name", "value"])
    assert table.splitlines()[2] == "| a | 1.235 |"


def test_seed_series_reads_one_metric_per_seed_from_the_rows_that_log_it():
    from trainkit.run import seed_series

    rows = [{"step": 1, "a": [1.0, 2.0]}, {"step": 2, "b": 5.0}, {"step": 3, "a": [3.0, 4.0]}]
    steps, values = seed_series(rows, "a")
    assert steps == [1, 3]
    np.testing.assert_array_equal(values, [[1.0, 3.0], [2.0, 4.0]])  # [seeds, N]
    steps, values = seed_series(rows, "b")  # a number is one seed
    assert steps == [2] and values.shape == (1, 1)
    assert seed_series(rows, "c")[0] == []
