"""Fault injection: concurrent runs, a full disk, killed drivers and tasks, damaged tables and checkpoints, leftover
processes. Each case runs on the session's Ray cluster and ends by checking that every id is in the stage's output
exactly once."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import with_updates

from td_ray import evaluate, index, reaper, score
from td_ray.cli import user_message
from td_ray.errors import CorruptTableError, DriverGoneError, StorageError, WorkspaceBusyError
from td_ray.lease import STALE_AFTER, Holder, StageLease, alive, lease_path, process_start
from td_ray.stage import _in_place, _remove_temporaries, read_record
from td_ray.workspace import CANDIDATES, EVAL_DOCS, RUN, SCORES, Workspace

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.Popen:
    """A Python process of its own (a second td-ray run), its first line of output readable."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _once(table: pa.Table, *columns: str) -> set:
    keys = list(zip(*(table[column].to_pylist() for column in columns)))
    assert len(keys) == len(set(keys)), "an id is in the output twice"
    return set(keys)


# --------------------------------------------------------------------------------------------- one run a stage
def test_a_second_run_of_a_stage_is_refused_while_the_first_lives_then_takes_over_its_lease(pipeline_run):
    config, results = pipeline_run
    workspace = Workspace(config.workspace)
    holder = _python("""
        import sys, time
        from td_ray.lease import StageLease
        from td_ray.workspace import Workspace
        StageLease(Workspace(sys.argv[1]), "evaluate").acquire()
        print("held", flush=True)
        time.sleep(600)
    """, config.workspace)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(WorkspaceBusyError) as busy:
            evaluate.run(config)
        assert time.perf_counter() - started < 5  # at once, before any work
        assert f"pid {holder.pid} on host" in str(busy.value) and workspace.location(lease_path("evaluate")) in str(
            busy.value)
    finally:
        _kill(holder)
    rerun = evaluate.run(config)  # the holder is gone: its lease is taken over at once (same host, dead pid)
    assert rerun.metrics["unchanged"] == 1.0 and not workspace.exists(lease_path("evaluate"))
    run = workspace.read_table(RUN)
    topics = workspace.read_table("inputs/eval_topics.parquet")["id"].to_pylist()
    assert {qid for qid, _ in _once(run, "qid", "docid")} == set(topics)


def test_a_lease_on_another_host_lapses_without_heartbeats_and_a_reused_pid_is_not_its_holder():
    now = time.time()
    elsewhere = Holder("another-host", 1, "1", "t", now - 600, now - 5)
    assert alive(elsewhere) and not alive(Holder(**{**elsewhere.__dict__, "heartbeat": now - STALE_AFTER - 1}))
    here = Holder(os.uname().nodename, os.getpid(), process_start(os.getpid()), "t", now, now)
    assert alive(here) and not alive(Holder(**{**here.__dict__, "process_start": "1"}))  # the pid, reused


def test_start_up_cleanup_keeps_temporaries_a_live_run_may_still_write(tmp_path):
    """In shared folders (inputs) only what was written before every other live run started goes; in the stage's
    own folder everything does, since its lease says no other run of it is alive."""
    workspace = Workspace(str(tmp_path))
    for relative in ("inputs/old.parquet.tmp-0a1b2c3d", "inputs/.new.json.0a1b2c3d.tmp", "score/todo.parquet.tmp-"
                     "0a1b2c3d", "inputs/kept.parquet"):
        workspace.write_text(relative, "x")
    old = Path(workspace.path("inputs/old.parquet.tmp-0a1b2c3d"))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    other = StageLease(workspace, "index")  # a run of another stage, started ten minutes ago
    other.holder = Holder(**{**other.holder.__dict__, "since": time.time() - 600})
    other.acquire()
    try:
        with StageLease(workspace, "score") as ours:
            _remove_temporaries(score.STAGE, workspace, ours)
    finally:
        other.release()
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert left == ["inputs/.new.json.0a1b2c3d.tmp", "inputs/kept.parquet"]


def test_blocks_of_another_key_left_by_a_crashed_run_are_removed_when_score_finishes(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    stale = "score/blocks/0123456789abcdef/part-00000000000000000000.parquet"
    workspace.write_table(pa.table({"qid": ["q"], "pid": ["p"], "score": [1.0]}), stale)
    assert score.run(config).metrics["unchanged"] == 1.0
    assert not workspace.exists("score/blocks")
    candidates = workspace.read_table(CANDIDATES)
    kept = {key for key, rank in zip(zip(candidates["qid"].to_pylist(), candidates["pid"].to_pylist()),
                                     candidates["rank"].to_pylist()) if rank <= config.score.top_k}
    assert _once(workspace.read_table(SCORES), "qid", "pid") == kept


# ------------------------------------------------------------------------------------------- nothing left behind
def test_a_killed_drivers_processes_end_with_it_and_its_workers_stop_committing(tmp_path):
    """The reaper ends what the driver started, even in a session of its own; a worker whose driver is gone, or
    whose run's lease another run took over, commits no block."""
    driver = _python("""
        import subprocess, sys, time
        from td_ray import reaper
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # as Ray's agents outlive a killed driver
        reaper.start()
        print(child.pid, flush=True)
        time.sleep(300)
    """)
    child = int(driver.stdout.readline())
    time.sleep(1.5)  # the reaper has seen the child
    workspace = Workspace(str(tmp_path))
    with StageLease(workspace, "score") as lease:  # the driver's lease, then the driver dies
        lease.holder = Holder(**{**lease.holder.__dict__, "pid": driver.pid,
                                 "process_start": process_start(driver.pid)})
        lease._write()

        def commit(qid: str, token: str | None) -> str:
            return workspace.commit_block("score/blocks/k", pa.table({"qid": [qid]}),
                                          pa.schema([("qid", pa.string())]), ["qid"], token)

        assert commit("a", lease.holder.token)
        with pytest.raises(DriverGoneError, match="no longer holds the stage's lease \\(now held by pid"):
            commit("b", "the token of a run whose lease was taken over")
        _kill(driver)
        with pytest.raises(DriverGoneError, match="is gone"):
            commit("c", lease.holder.token)
    assert len(workspace.block_names("score/blocks/k")) == 1
    deadline = time.time() + 10
    while process_start(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not process_start(child)
    assert reaper.watch(driver.pid) == 0  # nothing left to end


# ------------------------------------------------------------------------------------ a full disk, damaged tables
@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs (root only), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 16 * 1024) -> None:
    """Fill `disk` up to `leave` free bytes."""
    with open(disk / "filler", "ab") as handle:
        handle.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))


def _end_failed_dataset_actors() -> None:
    """Ray Data keeps the handles of a failed dataset's actors in a pending callback, so they hold their CPUs while
    the driver lives: a CLI run exits on the error, this test goes on and would wait for CPUs. End them."""
    import ray
    import ray.actor

    gc.collect()
    for handle in [item for item in gc.get_objects() if isinstance(item, ray.actor.ActorHandle)]:
        if repr(handle).startswith("Actor(MapWorker("):
            ray.kill(handle)


def _truncate(path: str) -> bytes:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return data


def test_a_full_disk_or_a_truncated_table_is_named_with_its_fix_and_the_rerun_completes(
        make_workspace, assets_root, small_disk, ray_cluster, monkeypatch, tmp_path):
    """The score stage of 24 queries on a workspace on a small disk, its MLflow store elsewhere: the disk fills while
    ingesting (on the driver), then after the text exports (inside the teacher actors); each time the error names the
    file and the fix, no temporary stays, and the rerun completes. Then its score table is truncated: distill names
    it with the command that rebuilds it, and that command does (its output no longer counts as in place)."""
    from td_ray import distill

    demo = make_workspace()
    config = with_updates(demo, workspace=str(small_disk / "ws"),
                          data={"candidates": {"format": "trec_run", "limit": 24,
                                               "path": str(assets_root / "demo" / "candidates.trec")}},
                          mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, score={"num_actors": 1})
    workspace = Workspace(config.workspace)

    _fill(small_disk)
    with pytest.raises(StorageError) as full:
        score.run(config)
    message = user_message(full.value)
    assert message.startswith("no space left on the device holding the workspace, writing ") and "/inputs/" in message
    assert "df -h" in message and "run the same command again" in message
    assert not [path for path in small_disk.rglob("*") if ".tmp" in path.name]

    export_text = score.export_text

    def export_then_fill(workspace, table):  # a Ray task: the lookups are written, then the disk is full
        folder = export_text(workspace, table)
        if "passages" in table:  # inline: the task cannot import this test module
            with open(small_disk / "filler", "ab") as handle:
                handle.write(b"\0" * shutil.disk_usage(small_disk).free)
        return folder

    (small_disk / "filler").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(score, "export_text", export_then_fill)
        with pytest.raises(Exception) as full:  # raised in the teacher actor, as it commits its block
            score.run(config)
    message = user_message(full.value)
    del full
    _end_failed_dataset_actors()
    assert message is not None and message.startswith("no space left on the device"), message
    assert "/score/blocks/" in message and "\n" not in message
    assert not [path for path in small_disk.rglob("*") if ".tmp" in path.name]

    (small_disk / "filler").unlink()
    first = score.run(config)
    candidates = workspace.read_table(CANDIDATES)
    kept = {key for key, rank in zip(zip(candidates["qid"].to_pylist(), candidates["pid"].to_pylist()),
                                     candidates["rank"].to_pylist()) if rank <= config.score.top_k}
    assert _once(workspace.read_table(SCORES), "qid", "pid") == kept and first.rows == len(kept)

    _truncate(workspace.path(SCORES))
    with pytest.raises(CorruptTableError) as damaged:
        distill.run(config)
    message = user_message(damaged.value)
    assert workspace.path(SCORES) in message and "Run `td-ray score --config" in message
    assert not _in_place(workspace, read_record(workspace, "score"))  # so that command scores again


def test_a_full_disk_in_a_ray_task_is_named_with_its_fix(small_disk, ray_cluster):
    from td_ray.raydata import in_task

    workspace = Workspace(str(small_disk / "ws"))
    _fill(small_disk, 0)
    with pytest.raises(StorageError) as full:
        in_task(Workspace.write_text, workspace, "text/lookup.json", "x" * 100_000)
    assert user_message(full.value).startswith(f"no space left on the device holding the workspace, writing "
                                               f"{workspace.path('text/lookup.json')}: free space there")


def test_a_truncated_input_is_read_again_from_its_source(pipeline_run):
    config, _ = pipeline_run
    workspace = Workspace(config.workspace)
    before = workspace.read_table(EVAL_DOCS)
    _truncate(workspace.path(EVAL_DOCS))
    assert index.run(config).metrics["unchanged"] == 1.0  # the copy of the source is made again; nothing else
    assert workspace.read_table(EVAL_DOCS).equals(before) and _once(before, "id")


# ------------------------------------------------------------------------------------ killed drivers and tasks
def _config_file(config, tmp_path: Path) -> Path:
    import ray

    path = tmp_path / "config.yaml"
    raw = config.model_dump(mode="json")
    raw["ray"]["address"] = ray.get_runtime_context().gcs_address  # the second driver joins the session's cluster
    path.write_text(yaml.safe_dump(raw))
    return path


def _driver_killed(config_file: Path, stage: str, patch: str, meanwhile=None) -> None:
    """Run `td-ray <stage>` in a driver of its own, after `patch` (code that may call `kill_driver()`, from any of the
    job's processes); wait for the driver to die of it. `meanwhile(pid)` runs beside the driver once `kill_driver`
    is reached, before the driver dies."""
    reached = config_file.with_name("reached")
    driver = _python(f"""
        import os, signal, sys, time
        from td_ray.cli import main
        driver = os.getpid()

        def kill_driver():
            open({str(reached)!r}, "w").close()
            time.sleep({3 if meanwhile else 1})  # what the task or worker reported is registered
            os.kill(driver, signal.SIGKILL)

{textwrap.indent(textwrap.dedent(patch), " " * 8)}
        sys.exit(main(["{stage}", "--config", sys.argv[1]]))
    """, str(config_file))
    deadline, ran = time.time() + 240, meanwhile is None
    try:
        while driver.poll() is None and time.time() < deadline:
            if not ran and reached.exists():
                meanwhile(driver.pid)
                ran = True
            time.sleep(0.05)
        assert driver.poll() == -signal.SIGKILL and ran, "the driver was not killed mid-stage"
    finally:
        _kill(driver)


def _refused_beside(pid: int, config) -> None:
    """A second index run on the workspace, beside the driver `pid` running it, stops at once naming that driver."""
    started = time.perf_counter()
    with pytest.raises(WorkspaceBusyError, match=f"the index stage of workspace .* is being run by another td-ray "
                                                 f"run \\(pid {pid} on host"):
        index.run(config)
    assert time.perf_counter() - started < 5


def test_a_driver_killed_mid_index_and_killed_shard_and_merge_tasks_leave_every_passage_once(
        make_workspace, assets_root, ray_cluster, monkeypatch, tmp_path):
    """A second run beside the first is refused; the first's driver is SIGKILLed as its merge starts; the rerun,
    whose first shard task and merge task are each SIGKILLed once and retried, holds every passage once."""
    from td_ray.retrieval.layout import build_path, read_index_meta

    config = make_workspace(index={"model": str(assets_root / "tiny-models" / "student"), "factory": "IVF4,Flat",
                                   "train_sample": 1000, "num_shards": 3, "keep_vectors": True},
                            compare_untrained=False)
    workspace = Workspace(config.workspace)
    _driver_killed(_config_file(config, tmp_path), "index", """
        import td_ray.index as index
        merge_task = index.merge_task

        def merge_killing_the_driver(*args):  # the shards are committed
            kill_driver()
            return merge_task(*args)

        index.merge_task = merge_killing_the_driver
    """, meanwhile=lambda pid: _refused_beside(pid, config))
    assert not workspace.exists("stages/index.json") and workspace.exists(lease_path("index"))  # died mid-stage

    marker = tmp_path / "killed"
    shard_task, merge_task = index.shard_task, index.merge_task

    def killed_once(name, original):
        def task(*args):
            if not (marker / name).exists():  # first attempt: the worker dies mid-task, Ray retries it
                (marker / name).parent.mkdir(exist_ok=True)
                (marker / name).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args)
        return task

    monkeypatch.setattr(index, "shard_task", killed_once("shard", shard_task))
    monkeypatch.setattr(index, "merge_task", killed_once("merge", merge_task))
    built = index.run(config)
    assert sorted(path.name for path in marker.iterdir()) == ["merge", "shard"]
    meta = read_index_meta(workspace)
    table = pq.read_table(build_path(workspace, meta, "embeddings.parquet"), columns=["faiss_id"])
    docs = workspace.read_table(EVAL_DOCS)
    assert len(_once(table, "faiss_id")) == built.metrics["passages"] >= docs.num_rows
    assert not workspace.exists(lease_path("index"))


def test_a_driver_killed_mid_distill_resumes_and_a_corrupt_checkpoint_falls_back_to_the_one_before(
        make_workspace, pipeline_run, ray_cluster, tmp_path):
    """Killed at step 5, after the checkpoints of steps 2 and 4; the newest is then truncated: the rerun resumes
    from step 2, and the examples hold each scored query once."""
    from td_ray import distill

    trained, _ = pipeline_run
    config = make_workspace(distill={"steps": 6, "checkpoint_every": 2, "log_every": 1, "batch_size": 4,
                                     "run_name": "faults"}, compare_untrained=False)
    source = Path(trained.workspace)
    for folder in ("inputs", "score", "translate"):
        shutil.copytree(source / folder, Path(config.workspace) / folder, ignore=shutil.ignore_patterns("blocks"))
    workspace = Workspace(config.workspace)
    snapshots = Path(workspace.path("ray_train")) / "faults-*" / "checkpoint_manager_snapshot.json"
    _driver_killed(_config_file(config, tmp_path), "distill", """
        import td_ray.distill.train as train

        def loop_killing_the_driver(loop_config):  # runs in the training worker, whose module is not patched
            import td_ray.distill.train as inner
            step_loss = inner.micro_batch_loss

            def micro_batch_loss(model, loss_fn, micro, *args, **kwargs):
                if micro.step == 4:  # the fifth step: once Ray has registered the checkpoints of steps 2 and 4
                    import glob, json
                    deadline = time.time() + 60
                    while time.time() < deadline and not [path for path in glob.glob(SNAPSHOT) if len(
                            json.load(open(path))["checkpoint_results"]) == 2]:
                        time.sleep(0.2)
                    kill_driver()
                return step_loss(model, loss_fn, micro, *args, **kwargs)

            inner.micro_batch_loss = micro_batch_loss
            inner.train_loop(loop_config)

        train.train_loop = loop_killing_the_driver
    """.replace("SNAPSHOT", repr(str(snapshots))))
    [snapshot] = Path(workspace.path("ray_train")).glob("faults-*/checkpoint_manager_snapshot.json")
    registered = json.loads(snapshot.read_text())
    assert [result["metrics"]["step"] for result in registered["checkpoint_results"]] == [2.0, 4.0]
    state = snapshot.parent / registered["latest_checkpoint_result"]["checkpoint_dir_name"] / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # the step-4 checkpoint: truncated

    result = distill.run(config)
    assert result.metrics["start_step"] == 2 and result.metrics["steps"] == 6
    examples = workspace.read_table("distill/examples.parquet")
    assert {qid for (qid,) in _once(examples, "qid")} <= set(pq.read_table(source / SCORES)["qid"].to_pylist())
    assert json.loads(workspace.read_text("stages/distill.json"))["rows"] == examples.num_rows



def test_a_read_only_or_vanished_workspace_is_named_with_its_fix(small_disk, tmp_path):
    workspace = Workspace(str(small_disk / "ws"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        with pytest.raises(StorageError, match=r"cannot be written \(read-only file system\), writing .*/ws/stages/"
                                               r"score\.json: make it writable for this user or set another workspace"):
            workspace.write_text("stages/score.json", "{}")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    gone = Workspace(str(tmp_path / "gone"))
    shutil.rmtree(tmp_path / "gone")
    with pytest.raises(StorageError, match="is gone \\(deleted or unmounted\\) while writing"):
        gone.write_table(pa.table({"id": ["a"]}), "inputs/docs.parquet")
    assert not (tmp_path / "gone").exists()  # not made again somewhere the user did not mean


def test_the_cli_prints_one_error_line_and_the_traceback_only_with_v(tmp_path, capsys):
    from td_ray.cli import main

    missing = str(tmp_path / "missing")
    assert main(["report", "--workspace", missing]) == 2
    assert capsys.readouterr().err == f"td-ray: error: workspace {missing} does not exist\n"
    assert main(["-v", "report", "--workspace", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith(
        f"td-ray: error: workspace {missing} does not exist\n")


def test_a_gpu_out_of_memory_in_a_ray_task_is_named_with_its_fix(ray_cluster):
    """torch's CUDA out-of-memory error, raised in a worker as a GPU raises it, reaches the user as one line that says
    which settings to lower, and that the rerun resumes."""
    import ray
    import torch

    def encode_on_a_full_gpu():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    with pytest.raises(Exception) as failed:
        ray.get(ray.remote(num_cpus=0)(encode_on_a_full_gpu).remote())
    message = user_message(failed.value)
    assert message.startswith("a GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "score.max_batch_tokens" in message and "index.batch_size" in message and "resumes" in message

