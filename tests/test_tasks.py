"""The task registry (ofa_lib.tasks) is the one place per task: every stage reads it, and what it names exists."""

import pytest

from ofa_lib import models, results, tasks
from ofa_lib.analysis import report
from ofa_lib.data import catalog, features, hub
from ofa_lib.train import config, metrics


@pytest.mark.parametrize("name", tasks.NAMES)
def test_every_dataset_a_task_names_exists_for_that_task(name):
    task = tasks.get(name)
    named = {task.data["train"], task.data["source_dev"], *task.data["targets"], *task.fetch}
    if task.paper_data:
        named |= {task.paper_data["train"], task.paper_data["source_dev"], *task.paper_data["targets"]}
    for dataset in named:
        assert catalog.task_of(dataset) == name, (name, dataset)
    assert set(task.fetch) <= set(hub.SOURCES), "ofa-data fetch needs a hub source for each"


@pytest.mark.parametrize("name", tasks.NAMES)
def test_every_stage_knows_every_task(name):
    task = tasks.get(name)
    assert name in config.TASKS and name in catalog.TASKS and name in features.FEATURE_TASKS
    assert models.AUTO_CLASSES[name].__name__ == task.head
    assert metrics.task_metrics(name) == list(task.metrics) and metrics.PRIMARY_METRIC[name] == task.primary_metric
    assert report.TASK_LABEL[name] == task.label and name in results.TASK_METRIC
    cfg = config.make_config(name, "smoke")  # every task has smoke defaults that validate
    assert cfg.train_dataset == task.data["train"]


def test_released_names_map_onto_the_study_names():
    assert report.TASK_LABEL["tydiqa"] == report.TASK_LABEL["qa"] == "TyDiQA-GoldP"
    assert results.TASK_METRIC["tydiqa"] == "f1" and results.TASK_METRIC["nli"] == "acc"


def test_an_unknown_task_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="task='pos' is unknown; expected one of nli, ner, qa, sib, sentiment"):
        tasks.get("pos")
    with pytest.raises(config.ConfigError, match="task"):
        config.make_config("pos", "smoke")


def test_the_sentiment_grid_plans(tmp_outputs):
    from ofa_lib.grid import spec as grid_spec

    grid = grid_spec.load_grid("smoke_sentiment")
    assert {r.cfg.task for r in grid.runs} == {"sentiment"} and len(grid.runs) == 2


@pytest.mark.slow
def test_sentiment_trains_and_scores_its_targets(tmp_outputs):
    """The task added through the registry trains end to end (smoke size) and scores every target language."""
    import pandas as pd

    from ofa_lib.train import training

    run_dir = training.run_training(config.make_config("sentiment", "smoke"), progress=False)
    rows = pd.read_parquet(run_dir / "metrics.parquet")
    test = rows[(rows["kind"] == "variant") & (rows["split"] == "test")]
    assert set(test["lang"]) == {"german", "hindi"} and set(test["metric"]) == {"accuracy"}
    assert test["value"].between(0, 1).all()
