"""The workspace on a real S3 server (SeaweedFS): tables, small files, copies in the node-local cache, shared models
and build mirrors, and what is written through an object store's rules."""
from __future__ import annotations

import os

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from conftest import with_updates
from processes import S3_CREDENTIALS, start_s3, stop

from td_ray import schemas
from td_ray.fingerprint import path_fingerprint
from td_ray.workspace import SHARED_PREFIX, Workspace, redacted


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server with the bucket `unit`, its credentials and endpoint in this process's environment."""
    base = tmp_path_factory.mktemp("s3")
    process, endpoint = start_s3(base / "data", "unit", dict(os.environ), base / "s3.log")
    saved = {name: os.environ.get(name) for name in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(S3_CREDENTIALS | {"AWS_ENDPOINT_URL_S3": f"http://{endpoint}"})
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    stop(process)


def test_a_colbert_index_built_and_searched_on_s3_equals_the_one_on_a_local_disk(make_workspace, colbert_student,
                                                                                 ray_cluster, s3, tmp_path):
    """The codec task, the encoder actors, the token shard tasks (on one node's copy) and two search tasks, all
    through the object store: the same index files and the same run as on a local workspace. The session's Ray
    workers started before this server, so the URI carries the endpoint and the credentials."""
    from td_ray import evaluate, index
    from td_ray.retrieval import plaid
    from td_ray.retrieval.layout import read_index_meta

    local = make_workspace(index={"model": str(colbert_student), "num_shards": 2, "colbert": {"nbits": 2}},
                           evaluate={"search_tasks": 2, "search_cpus": 0.5},
                           mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    secret = f"{S3_CREDENTIALS['AWS_ACCESS_KEY_ID']}:{S3_CREDENTIALS['AWS_SECRET_ACCESS_KEY']}"
    remote = with_updates(local, workspace=f"s3://{secret}@unit/colbert?endpoint_override={s3}&scheme=http")
    runs = {}
    for config in (local, remote):
        index.run(config)
        runs[config.workspace] = evaluate.run(config).metrics
    on_disk, on_s3 = Workspace(local.workspace), Workspace(remote.workspace)
    meta = read_index_meta(on_s3)
    assert meta["kind"] == "colbert" and meta == read_index_meta(on_disk) | {"model": meta["model"]}
    for name in plaid.FILES:
        with on_s3.fs.open_input_stream(on_s3.path(f"{meta['build']}/{name}")) as handle:
            assert handle.read() == (Path(on_disk.path(meta["build"])) / name).read_bytes(), name
    assert runs[remote.workspace] == runs[local.workspace]
    assert on_s3.read_text("evaluate/run.trec") == Path(on_disk.path("evaluate/run.trec")).read_text()


@pytest.fixture
def workspace(s3, tmp_path, monkeypatch, request):
    monkeypatch.setenv("TD_RAY_CACHE", str(tmp_path / "cache"))
    return Workspace(f"s3://unit/{request.node.name}")


def test_tables_and_small_files_round_trip_and_name_their_place(workspace):
    workspace.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), "inputs/q.parquet", schemas.QUERIES)
    assert workspace.read_table("inputs/q.parquet")["id"].to_pylist() == ["a", "b"]
    workspace.write_text("stages/x.json", '{"key": "k"}\n')
    assert workspace.read_text("stages/x.json") == '{"key": "k"}\n'
    assert workspace.location("stages/x.json") == f"s3://{workspace.root}/stages/x.json"
    assert not workspace.is_local and workspace.child_uri("untrained") == f"s3://{workspace.root}/untrained"


def test_a_copy_is_downloaded_once_per_content_and_again_when_it_changes(workspace, tmp_path):
    folder = tmp_path / "lookup"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    workspace.upload(folder, "text/lookup")
    first = workspace.local_copy("text/lookup")
    assert (first / "a.txt").read_text() == "one" and workspace.local_copy("text/lookup") == first
    (first / "a.txt").write_text("changed here")  # the cache is trusted while the content is the same
    assert (workspace.local_copy("text/lookup") / "a.txt").read_text() == "changed here"
    (folder / "a.txt").write_text("two")  # the same size, uploaded within the same second: another content
    workspace.upload(folder, "text/lookup")
    second = workspace.local_copy("text/lookup")
    assert second != first and (second / "a.txt").read_text() == "two" and not first.exists()
    workspace.write_text("stages/x.json", "{}")  # a single object: by its size and time
    assert workspace.local_copy("stages/x.json").read_text() == "{}"


def test_a_driver_local_model_is_shared_by_content_and_resolved_on_any_node(workspace, tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (model / "sub" / "config.json").write_text("{}")
    reference = workspace.share(str(model))
    assert reference.startswith(SHARED_PREFIX) and workspace.share(str(model)) == reference
    resolved = workspace.resolve(reference)
    assert path_fingerprint(resolved) == path_fingerprint(model)  # the same content, so the same fingerprint
    assert workspace.share("org/hub-model") == "org/hub-model" and workspace.resolve("org/hub-model") == "org/hub-model"
    (model / "weights.bin").write_bytes(b"\x02" * 2000)
    assert workspace.share(str(model)) != reference  # new content, new place


def test_a_mirror_fetches_what_a_task_reads_and_commits_what_it_wrote(workspace):
    mirror = workspace.mirror("index/builds/k")
    (mirror.folder / "shard-000.faiss").write_bytes(b"shard")
    mirror.commit("shard-000.faiss")
    assert workspace.exists("index/builds/k/shard-000.faiss") and mirror.size("shard-000.faiss") == 5
    (mirror.folder / "shard-000.faiss").unlink()
    assert (mirror.fetch("shard-000.faiss") / "shard-000.faiss").read_bytes() == b"shard"
    mirror.remove("shard-000.faiss")
    assert not workspace.exists("index/builds/k/shard-000.faiss")
    with pytest.raises(FileNotFoundError, match="shard-001.faiss"):
        mirror.fetch("shard-001.faiss")


def test_an_upload_the_server_refuses_raises(workspace, tmp_path, s3):
    local = tmp_path / "model"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"x" * 10)
    workspace.fs = pafs.S3FileSystem(access_key="td-ray-test", secret_key="wrong", endpoint_override=s3,
                                     scheme="http", region="us-east-1")
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # the server's refusal, not a silent loss
        workspace.upload(local, "uploaded/model")


def test_a_table_larger_than_one_server_copy_is_committed_by_streaming_it(workspace, monkeypatch):
    import td_ray.workspace as module

    monkeypatch.setattr(module, "SERVER_COPY_LIMIT", 100)  # as if the table were past S3's 5 GiB copy limit
    streamed, copy = [], module.shutil.copyfileobj
    monkeypatch.setattr(module.shutil, "copyfileobj", lambda *args: streamed.append(args) or copy(*args))
    table = pa.table({"id": [f"q{i}" for i in range(1000)], "text": ["t"] * 1000})
    workspace.write_table(table, "inputs/big.parquet", schemas.QUERIES)
    assert len(streamed) == 1 and workspace.read_table("inputs/big.parquet").equals(table.cast(schemas.QUERIES))
    assert [info.base_name for info in workspace.fs.get_file_info(pafs.FileSelector(workspace.path("inputs")))] == [
        "big.parquet"]  # no temporary left


def test_credentials_never_appear_in_what_is_shown():
    assert redacted("s3://AKIA:SECRET@bucket/ws") == "s3://***@bucket/ws"
    assert "SECRET" not in redacted("s3://bucket/ws?access_key=AKIA&secret_key=SECRET&region=x")
