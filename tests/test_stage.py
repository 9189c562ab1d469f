"""The one stage runner: what it decides for every stage (unchanged, records, declared sections), and that every stage
goes through it."""
from __future__ import annotations

import importlib
import inspect

import pyarrow as pa
import pytest

from td_ray import schemas
from td_ray.stage import Outcome, Stage, read_record, record_path, run_stage
from td_ray.workspace import Workspace

STAGE_MODULES = ["td_ray.translate", "td_ray.score", "td_ray.distill", "td_ray.index", "td_ray.evaluate"]


class CountingStage(Stage):
    """A stage named like the index stage (so it has a config section) whose work writes one table."""

    name = "index"
    sections = ("evaluate",)

    def __init__(self, key: str = "k1"):
        self.calls, self.key_value = 0, key

    def key(self, context) -> str:
        return self.key_value

    def work(self, context, key: str) -> Outcome:
        self.calls += 1
        context.workspace.write_table(pa.table({"id": ["a"], "text": ["x"]}), "index/out.parquet", schemas.QUERIES)
        assert context.section("evaluate").depth == 100 and context.options.num_shards == 2
        with pytest.raises(KeyError, match="without declaring"):
            context.section("distill")
        return Outcome(1, {"out": "index/out.parquet"}, {"made": 1.0}, parts={"p": key})


def test_a_stage_runs_once_per_key_and_again_when_its_output_is_lost(make_workspace):
    config = make_workspace()
    workspace = Workspace(config.workspace)
    stage = CountingStage()
    first = run_stage(stage, config)
    assert stage.calls == 1 and first.metrics == {"made": 1.0}
    record = read_record(workspace, "index")
    assert record["key"] == "k1" and record["parts"] == {"p": "k1"} and record["run_id"] == first.run_id
    again = run_stage(stage, config)
    assert stage.calls == 1 and again.metrics == {"made": 1.0, "unchanged": 1.0} and again.rows == 1
    assert again.outputs == {"out": workspace.location("index/out.parquet")}
    workspace.fs.delete_file(workspace.path("index/out.parquet"))
    run_stage(stage, config)
    assert stage.calls == 2
    stage.key_value = "k2"
    run_stage(stage, config)
    assert stage.calls == 3 and read_record(workspace, "index")["key"] == "k2"


def test_a_failed_work_leaves_the_last_record(make_workspace):
    config = make_workspace()
    stage = CountingStage()
    run_stage(stage, config)

    class Failing(CountingStage):
        def work(self, context, key):
            raise RuntimeError("work failed")

    with pytest.raises(RuntimeError, match="work failed"):
        run_stage(Failing("k2"), config)
    assert read_record(Workspace(config.workspace), "index")["key"] == "k1"
    assert Workspace(config.workspace).exists(record_path("index"))


@pytest.mark.parametrize("name", STAGE_MODULES)
def test_every_stage_is_a_stage_run_by_the_runner(name):
    module = importlib.import_module(name)
    assert isinstance(module.STAGE, Stage) and module.STAGE.name == name.rsplit(".", 1)[1]
    source = inspect.getsource(module)
    for skeleton in ("stage_run(", "remove_temporaries(", "StageResult(", "ingest("):
        assert skeleton not in source, f"{name} repeats the runner's {skeleton}"
