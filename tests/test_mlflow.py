"""MLflow tracking against real MLflow: sqlite stores in temp dirs and a real ``mlflow server``.

Run as a script (``python test_mlflow.py replay RUN_ID OUT``) it is the replaying process of
the replay test: it gets nothing but the run id (and the tracking URI in the environment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from models import HandLoRANet, peft_bert
from torch import nn

from safefreeze import AdapterPattern, FreezePlan, PlanError, SAFEConfig, SAFEOptimizer, cubic_threshold
from safefreeze.integrations.mlflow import (
    METRIC_FROZEN,
    METRIC_RAW_SCORE,
    METRIC_SCORE,
    METRIC_THRESHOLD,
    METRIC_TRAINABLE,
    TAG_FINGERPRINT,
    TAG_PLAN,
    TAG_PLAN_ARTIFACT,
    TAG_REPLAYED_FROM,
    ConfigConflictError,
    MLflowFreezeLogger,
    TrackingError,
    _metric_keys,
    load_plan,
    log_plan,
    tag_replay,
)

HAND_LORA = AdapterPattern(base="base", params=r"lora_(?:down|up)\..+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The paper's rule (one unit per adapter, scores over the top one, frozen by score, nothing
# merged) on a 4-layer BERT, LoRA on q/v: 8 adapters, several freeze events within BERT_STEPS.
BERT_CONFIG = SAFEConfig.paper(warmup_steps=2, freeze_end_step=8, tau_target=0.6, max_tokens=16)
BERT_STEPS = 10
# 4 hand-made adapters: all but the top one freeze at step 4.
HAND_CONFIG = SAFEConfig.paper(warmup_steps=3, freeze_end_step=6, tau_target=0.9)
# MLflow's HTTP client retries for minutes by default; a dead server must fail fast here.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


# ---- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating one takes seconds); tests use their own runs."""
    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the Default experiment's artifact root is ./mlruns at creation time
        mlflow.MlflowClient(uri).get_experiment("0")
    return uri


@pytest.fixture(autouse=True)
def _isolated(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Log to the module store via MLFLOW_TRACKING_URI, from a scratch working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    while mlflow.active_run() is not None:  # never leak a run into the next test
        mlflow.end_run()


def _hand(config: SAFEConfig = HAND_CONFIG) -> tuple[nn.Module, SAFEOptimizer]:
    torch.manual_seed(0)
    model = HandLoRANet(depth=4)
    return model, SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, config, pattern=HAND_LORA)


def _train_hand(model: nn.Module, opt: SAFEOptimizer, steps: int, logger: MLflowFreezeLogger | None) -> None:
    g = torch.Generator().manual_seed(opt.controller.step)
    for _ in range(steps):
        model(torch.randn(16, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if logger is not None:
            logger.log_step()


def _bert(plan: FreezePlan | None = None) -> tuple[nn.Module, SAFEOptimizer]:
    """peft_bert with dropout on (BERT's and LoRA's) and AdamW, recording or replaying."""
    model = peft_bert(layers=4, seed=0, lora_dropout=0.1)
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if plan is not None:
        return model, SAFEOptimizer(inner, model, plan=plan)
    return model, SAFEOptimizer(inner, model, BERT_CONFIG)


def _bert_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    mask = (torch.arange(12) < torch.randint(6, 13, (4, 1), generator=gen)).long()  # (B, T)
    ids = torch.randint(0, 100, (4, 12), generator=gen)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=gen)}


def _train_bert(
    model: nn.Module, opt: SAFEOptimizer, logger: MLflowFreezeLogger | None, *, per_step: bool = True
) -> list[tuple[int, float, float, float]]:
    """Train BERT_STEPS steps; return what the optimizer itself shows after each step.

    Rows are ``(step, frozen adapters, trainable adapter params, threshold)``, from step 0.
    """
    torch.manual_seed(1)  # dropout masks
    seen = [_observed(opt)]
    for step in range(BERT_STEPS):
        model(**_bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
        if logger is not None and per_step:
            logger.log_step()
        seen.append(_observed(opt))
    return seen


def _observed(opt: SAFEOptimizer) -> tuple[int, float, float, float]:
    cfg, step = opt.plan.config, opt.controller.step
    trainable = sum(p.numel() for p in opt.controller.trainable_params())
    tau = cubic_threshold(
        step, warmup_steps=cfg.warmup_steps, freeze_end_step=cfg.freeze_end_step, tau_target=cfg.tau_target
    )
    return step, float(len(opt.frozen_adapters)), float(trainable), tau


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact(client: mlflow.MlflowClient, run_id: str, path: str, tmp: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_bytes()


def _said(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What safefreeze printed to stderr (MLflow prints its own lines and progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("safefreeze:")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class _Server:
    url: str
    root: Path
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """Kill the server and its workers at once (a crash, not a shutdown)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@contextlib.contextmanager
def _mlflow_server(root: Path, port: int | None = None) -> Iterator[_Server]:
    """``mlflow server`` on loopback (a free port by default) with a sqlite store and proxied artifacts.

    Started again on the same ``root`` and port, it is the same server come back.
    """
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port or _free_port()}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", url.rpartition(":")[2],
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/db.sqlite",
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    # The job runner (GenAI jobs) starts extra processes this test does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "server.log"
    with open(log, "ab") as out:
        # A session of its own, so the server and its uvicorn workers stop as one group.
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = _Server(url, root, process)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


# ---- logging ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_step", [True, False], ids=["log_step", "freeze_events_only"])
def test_logger_logs_exact_metrics_params_tags_and_artifacts(
    store: str, tmp_path: Path, per_step: bool
) -> None:
    model, opt = _bert()
    with MLflowFreezeLogger(opt) as logger:
        seen = _train_bert(model, opt, logger, per_step=per_step)
    assert mlflow.active_run() is None  # the logger started the run, so it ended it
    assert len(opt.plan.events) >= 2  # several freezes: the timeline has a shape

    client = mlflow.MlflowClient(store)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "safefreeze.warmup_steps": "2",
        "safefreeze.freeze_end_step": "8",
        "safefreeze.tau_target": "0.6",
        "safefreeze.normalization": "max",
        "safefreeze.score_every": "None",
        "safefreeze.max_tokens": "16",
        "safefreeze.group_by": "None",
        "safefreeze.seed": "0",
        "safefreeze.order": "score",
        "safefreeze.units": "adapter",
        "safefreeze.merge": "False",
        "safefreeze.eval_frozen": "False",
        "safefreeze.adapters": "8",
        "safefreeze.score_interval": "1",
    }
    safe_tags = {k: v for k, v in run.data.tags.items() if k.startswith("safefreeze.")}
    assert safe_tags == {
        TAG_PLAN: "true",
        TAG_PLAN_ARTIFACT: "safefreeze/plan.json",
        TAG_FINGERPRINT: opt.plan.fingerprint,
    }

    # Per-step metrics: what the optimizer showed after each step, steps 0..10.
    assert _history(client, logger.run_id, METRIC_FROZEN) == [(s, f) for s, f, _, _ in seen]
    assert _history(client, logger.run_id, METRIC_TRAINABLE) == [(s, n) for s, _, n, _ in seen]
    assert _history(client, logger.run_id, METRIC_THRESHOLD) == [(s, t) for s, _, _, t in seen]
    assert seen[0][2] == 8 * 2 * 4 * 32 and seen[-1][1] >= 2  # 8 adapters of r=4 at hidden 32
    thresholds = dict(_history(client, logger.run_id, METRIC_THRESHOLD))
    assert all(thresholds[e.step] == e.threshold for e in opt.plan.events)
    # Final scores: once each, at the step the warm-up ended.
    units = list(opt.controller.units)
    for unit in units:
        assert _history(client, logger.run_id, METRIC_SCORE + unit) == [(2, opt.plan.normalized_scores[unit])]
        assert _history(client, logger.run_id, METRIC_RAW_SCORE + unit) == [(2, opt.plan.raw_scores[unit])]
    expected_keys = {METRIC_FROZEN, METRIC_TRAINABLE, METRIC_THRESHOLD}
    expected_keys |= {METRIC_SCORE + u for u in units} | {METRIC_RAW_SCORE + u for u in units}
    assert set(run.data.metrics) == expected_keys

    listed = [a.path for a in client.list_artifacts(logger.run_id, "safefreeze")]
    assert sorted(listed) == ["safefreeze/freeze_timeline.png", "safefreeze/plan.json"]
    text = _artifact(client, logger.run_id, "safefreeze/plan.json", tmp_path).decode()
    assert json.loads(text) == json.loads(opt.plan.to_json())
    assert FreezePlan.from_json(text) == opt.plan
    assert _artifact(client, logger.run_id, "safefreeze/freeze_timeline.png", tmp_path).startswith(PNG_MAGIC)


def test_without_log_step_metrics_arrive_at_each_freeze(store: str) -> None:
    model, opt = _hand()
    logger = MLflowFreezeLogger(opt)
    client = mlflow.MlflowClient(store)
    _train_hand(model, opt, 3, None)  # warm-up: nothing froze yet, nothing logged yet
    assert _history(client, logger.run_id, METRIC_FROZEN) == []
    _train_hand(model, opt, 1, None)  # step 4 freezes three adapters: steps 0..4 are logged
    assert opt.plan.events[0].step == 4
    assert _history(client, logger.run_id, METRIC_FROZEN) == [
        (0, 0.0),
        (1, 0.0),
        (2, 0.0),
        (3, 0.0),
        (4, 3.0),
    ]
    _train_hand(model, opt, 2, None)
    logger.finish()
    assert _history(client, logger.run_id, METRIC_FROZEN)[-2:] == [(5, 3.0), (6, 3.0)]
    assert opt.controller.callbacks == ()  # unsubscribed: later freezes log nothing


def test_embedded_default_store_is_mlflow_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    model, opt = _hand()
    with MLflowFreezeLogger(opt) as logger:
        _train_hand(model, opt, 6, logger)
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_PLAN] == "true"
    assert list((tmp_path / "mlruns").rglob("plan.json"))  # artifacts beside it, in ./mlruns
    assert load_plan(logger.run_id) == opt.plan
    # The logger set no tracking URI of its own: the environment still decides.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_an_active_run_is_logged_into_and_left_active(store: str) -> None:
    model, opt = _hand()
    with mlflow.start_run() as run:
        mlflow.log_metric("loss", 1.5, step=0)
        logger = MLflowFreezeLogger(opt)
        assert logger.run_id == run.info.run_id
        _train_hand(model, opt, 6, logger)
        logger.finish()
        active = mlflow.active_run()
        assert active is not None and active.info.run_id == run.info.run_id
        client = mlflow.MlflowClient(store)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert set(finished.data.metrics) >= {"loss", METRIC_FROZEN, METRIC_THRESHOLD}
    assert _history(client, run.info.run_id, METRIC_FROZEN)[-1] == (6, 3.0)
    assert finished.data.tags[TAG_PLAN] == "true"


def test_user_metrics_go_to_the_run_the_logger_started(store: str) -> None:
    model, opt = _hand()
    with MLflowFreezeLogger(opt, run_name="safe-run") as logger:
        mlflow.log_metric("loss", 0.25, step=1)
        _train_hand(model, opt, 1, logger)
    run = mlflow.MlflowClient(store).get_run(logger.run_id)
    assert run.info.run_name == "safe-run"
    assert run.data.metrics["loss"] == 0.25


def test_relogging_the_same_config_is_a_no_op_and_a_changed_one_is_refused(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = _hand()
    _train_hand(model, opt, 6, None)
    client = mlflow.MlflowClient(store)
    with mlflow.start_run() as run:
        uri = log_plan(opt.plan)
        assert uri == f"runs:/{run.info.run_id}/safefreeze/plan.json"
        params = client.get_run(run.info.run_id).data.params
        assert log_plan(opt.plan) == uri  # identical config: nothing to do, no error
        changed = dataclasses.replace(opt.plan, config=dataclasses.replace(opt.plan.config, tau_target=0.5))
        with pytest.raises(ConfigConflictError) as info:
            log_plan(changed)
        assert "safefreeze.tau_target: logged '0.9', now '0.5'" in str(info.value)
        assert "write-once" in str(info.value) and run.info.run_id in str(info.value)
        # A second SAFE run with another config in the same MLflow run is refused up front.
        _, opt2 = _hand(dataclasses.replace(HAND_CONFIG, warmup_steps=4))
        with pytest.raises(ConfigConflictError, match=r"safefreeze\.warmup_steps: logged '3', now '4'"):
            MLflowFreezeLogger(opt2)
        assert opt2.controller.callbacks == ()
    after = client.get_run(run.info.run_id)
    assert after.data.params == params
    assert load_plan(run.info.run_id) == opt.plan
    # MLFLOW_RUN_ID makes the logger resume that run itself: refused, it closes it again.
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    with pytest.raises(ConfigConflictError):
        MLflowFreezeLogger(opt2)
    assert mlflow.active_run() is None
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_the_score_interval_the_config_resolves_is_a_param(store: str) -> None:
    # score_every=None lets the rule choose; the param says what it chose.
    model, opt = _hand()
    _train_hand(model, opt, 6, None)
    sparse = dataclasses.replace(opt.plan, config=SAFEConfig.for_run(337))
    client = mlflow.MlflowClient(store)
    for plan, interval in ((opt.plan, "1"), (sparse, "5")):
        with mlflow.start_run() as run:
            log_plan(plan)
        params = client.get_run(run.info.run_id).data.params
        assert (params["safefreeze.score_every"], params["safefreeze.score_interval"]) == ("None", interval)


def test_log_plan_and_tag_replay_need_a_run() -> None:
    _, opt = _hand()
    with pytest.raises(ValueError, match=r"log_plan needs a run.*mlflow\.start_run\(\) or pass run_id"):
        log_plan(opt.plan)
    with pytest.raises(ValueError, match=r"tag_replay needs a run"):
        tag_replay("0" * 32)


# ---- loading plans back -----------------------------------------------------------------


def test_load_plan_reads_run_ids_and_runs_uris(store: str) -> None:
    model, opt = _hand()
    _train_hand(model, opt, 6, None)
    client = mlflow.MlflowClient(store)
    run_id = client.create_run("0").info.run_id
    log_plan(opt.plan, run_id=run_id)
    for ref in (
        run_id,
        f"runs:/{run_id}",
        f"runs:/{run_id}/safefreeze",
        f"runs:/{run_id}/safefreeze/plan.json",
    ):
        assert load_plan(ref) == opt.plan, ref
    # Another artifact directory: the tag says where the plan is.
    other = client.create_run("0").info.run_id
    assert log_plan(opt.plan, run_id=other, artifact_path="plans/v1") == f"runs:/{other}/plans/v1/plan.json"
    assert client.get_run(other).data.tags[TAG_PLAN_ARTIFACT] == "plans/v1/plan.json"
    assert load_plan(other) == opt.plan
    # A run managed by hand records what it replays with tag_replay.
    with mlflow.start_run() as replay:
        tag_replay(f"runs:/{other}/plans/v1/plan.json")
    assert client.get_run(replay.info.run_id).data.tags[TAG_REPLAYED_FROM] == other
    # An explicit tracking URI beats the environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "sqlite:///does-not-exist.db")
        assert load_plan(run_id, tracking_uri=store) == opt.plan
        with pytest.raises(TrackingError, match=r"no MLflow store at sqlite:///does-not-exist\.db"):
            load_plan(run_id)
    assert not Path("does-not-exist.db").exists()


def test_load_plan_rejects_corrupt_foreign_and_missing_plans(store: str) -> None:
    _, opt = _hand()
    client = mlflow.MlflowClient(store)

    def run_with(text: str) -> str:
        run_id: str = client.create_run("0").info.run_id
        client.log_text(run_id, text, "safefreeze/plan.json")
        client.set_tag(run_id, TAG_PLAN, "true")
        return run_id

    good = opt.plan.to_json()
    with pytest.raises(PlanError, match=r"runs:/\w+/safefreeze/plan\.json is not valid JSON"):
        load_plan(run_with(good[: len(good) // 2]))
    newer = json.dumps({**json.loads(good), "version": 99})
    with pytest.raises(PlanError, match=r"has plan schema version 99; this safefreeze reads version"):
        load_plan(run_with(newer))
    binary = client.create_run("0").info.run_id
    client.log_dict(binary, {}, "safefreeze/plan.json")  # then overwritten with a pickle
    with tempfile.TemporaryDirectory() as tmp:
        pickled = Path(tmp) / "plan.json"
        pickled.write_bytes(b"\x80\x04\x95\x00\xff")
        client.log_artifact(binary, str(pickled), "safefreeze")
    client.set_tag(binary, TAG_PLAN, "true")
    with pytest.raises(PlanError, match=rf"runs:/{binary}/safefreeze/plan\.json is not .*UTF-8"):
        load_plan(binary)
    with pytest.raises(PlanError, match=r"expected schema 'safefreeze\.plan', got 'other'"):
        load_plan(run_with(json.dumps({"schema": "other"})))
    bare = client.create_run("0").info.run_id
    with pytest.raises(PlanError, match=rf"run {bare} at {store} carries no safefreeze plan"):
        load_plan(bare)
    with pytest.raises(TrackingError, match=r"downloading plan artifact .*/nope/plan\.json"):
        load_plan(f"runs:/{bare}/nope")
    with pytest.raises(
        TrackingError, match=rf"MLflow at {store} failed while reading run {'f' * 32}.*not found"
    ):
        load_plan("f" * 32)
    with pytest.raises(ValueError, match=r"expected an MLflow run id or a runs:/<run_id>\[/<path>\] URI"):
        load_plan("some/path.json")


# ---- replay -----------------------------------------------------------------------------


def _replay_main(argv: list[str]) -> int:
    """The replaying process: nothing but a run id in, weights and the replay's run id out."""
    source, out = argv
    torch.set_num_threads(1)
    model, opt = _bert(load_plan(source))
    with MLflowFreezeLogger(opt, replayed_from=source) as logger:
        _train_bert(model, opt, logger)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)
    print(json.dumps({"run_id": logger.run_id, "replaying": opt.controller.replaying}))
    return 0


@pytest.mark.slow
def test_replay_in_another_process_from_the_run_id_is_bit_identical(store: str, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replaying process uses one thread too
    try:
        model, opt = _bert()
        with MLflowFreezeLogger(opt) as logger:
            _train_bert(model, opt, logger)
    finally:
        torch.set_num_threads(threads)
    source = logger.run_id
    assert source is not None and opt.plan.events

    out = tmp_path / "replayed.pt"
    done = subprocess.run(
        [sys.executable, __file__, "replay", source, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["replaying"]  # no scoring in the replay: the plan came from the run
    replay_id = report["run_id"]

    replayed = torch.load(out, weights_only=True)
    mine = dict(model.named_parameters())
    assert list(replayed) == list(mine)
    different = [n for n, p in mine.items() if not torch.equal(p.detach(), replayed[n])]
    assert different == []
    client = mlflow.MlflowClient(store)
    assert replay_id != source
    assert client.get_run(replay_id).data.tags[TAG_REPLAYED_FROM] == source
    assert load_plan(replay_id).events == opt.plan.events


# ---- a real server, and faults ----------------------------------------------------------


@pytest.mark.slow
def test_a_real_server_over_http(tmp_path: Path) -> None:
    with _mlflow_server(tmp_path) as server:
        model, opt = _hand()
        with MLflowFreezeLogger(opt, tracking_uri=server.url, experiment_name="safe", strict=True) as logger:
            _train_hand(model, opt, 6, logger)
        assert mlflow.active_run() is None  # a client-created run on another URI: not activated
        client = mlflow.MlflowClient(server.url)
        run = client.get_run(logger.run_id)
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied over HTTP
        assert client.get_experiment(run.info.experiment_id).name == "safe"
        assert _history(client, run.info.run_id, METRIC_FROZEN) == [(s, 0.0) for s in range(4)] + [
            (4, 3.0),
            (5, 3.0),
            (6, 3.0),
        ]
        assert load_plan(logger.run_id, tracking_uri=server.url) == opt.plan
        assert load_plan(f"runs:/{logger.run_id}/safefreeze/plan.json", tracking_uri=server.url) == opt.plan
        stored = list((tmp_path / "artifacts").rglob("*"))
        assert {p.name for p in stored if p.is_file()} == {"plan.json", "freeze_timeline.png"}
        assert (tmp_path / "db.sqlite").is_file()
    assert server.process.poll() is not None


def test_unreachable_server_falls_back_to_a_local_plan_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)
    url = f"http://127.0.0.1:{_free_port()}"
    model, opt = _hand()
    with pytest.warns(RuntimeWarning) as warned:
        logger = MLflowFreezeLogger(opt, tracking_uri=url)
        _train_hand(model, opt, 6, logger)  # training goes on
        logger.finish()
    assert len(opt.frozen_adapters) == 3
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    assert messages[0].startswith(f"MLflow logging to {url} failed while starting the run: MlflowException: ")
    assert "Connection refused" in messages[0] and "training continues without MLflow" in messages[0]
    assert logger.run_id is None and logger.error is not None
    path = logger.fallback_path
    assert path is not None and path.parent == tmp_path and path.name.startswith("safefreeze-plan-")
    assert path.read_text() == opt.plan.to_json()
    assert FreezePlan.load(path) == opt.plan
    err = capsys.readouterr().err
    assert f"MLflow logging to {url} failed (MlflowException: " in err
    assert f"the freeze plan was saved to {path}" in err
    assert messages[1] == err.strip().splitlines()[-1]


def test_unreachable_server_with_strict_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)
    url = f"http://127.0.0.1:{_free_port()}"
    _, opt = _hand()
    with pytest.raises(TrackingError) as info:
        MLflowFreezeLogger(opt, tracking_uri=url, strict=True)
    assert str(info.value).startswith(
        f"MLflow logging to {url} failed while starting the run: MlflowException:"
    )
    assert "Connection refused" in str(info.value)
    assert type(info.value.__cause__).__name__ == "MlflowException"
    assert list(tmp_path.iterdir()) == []  # nothing to fall back on: training never started


@pytest.mark.slow
def test_server_dying_mid_run_loses_nothing_and_names_the_run_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)
    fallback = tmp_path / "saved" / "plan.json"
    model, opt = _hand()
    with _mlflow_server(tmp_path / "server") as server:
        logger = MLflowFreezeLogger(opt, tracking_uri=server.url, fallback_path=fallback)
        _train_hand(model, opt, 2, logger)
        server.kill()
        with pytest.warns(
            RuntimeWarning, match=rf"MLflow logging to {server.url} failed while logging the metrics"
        ):
            _train_hand(model, opt, 4, logger)  # freezes at step 4 with the server gone
        assert len(opt.frozen_adapters) == 3
        with pytest.warns(RuntimeWarning) as warned:
            logger.finish()
    run_id = logger.run_id
    assert run_id is not None
    assert logger.fallback_path == fallback
    assert fallback.read_text() == opt.plan.to_json()
    err = _said(capsys)
    assert len(err) == 2 and err == [str(w.message) for w in warned]
    assert err[0].endswith(f"the freeze plan was saved to {fallback}")
    assert err[1].startswith(f"safefreeze: MLflow run {run_id} at {server.url} stays RUNNING: ending it")
    assert err[1].endswith(f"set_terminated('{run_id}', 'FAILED')")
    # What reached the server before it died is in its store.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/server/db.sqlite")
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert TAG_PLAN not in run.data.tags
    assert _history(client, run_id, METRIC_FROZEN) == [(0, 0.0), (1, 0.0), (2, 0.0)]


@pytest.mark.slow
def test_a_server_back_by_the_end_gets_the_plan_and_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)
    model, opt = _hand()
    root, port = tmp_path / "server", _free_port()
    with _mlflow_server(root, port) as server:
        logger = MLflowFreezeLogger(opt, tracking_uri=server.url, experiment_name="safe")
        _train_hand(model, opt, 2, logger)
        server.kill()
    with pytest.warns(RuntimeWarning, match=r"failed while logging the metrics of steps 3\.\.3"):
        _train_hand(model, opt, 4, logger)
    with _mlflow_server(root, port) as back:  # the same store, the same URL
        assert back.url == server.url
        with pytest.warns(RuntimeWarning) as warned:
            logger.finish()
        messages = [str(w.message) for w in warned]
        assert messages == _said(capsys)
        run_id = logger.run_id
        assert run_id is not None
        client = mlflow.MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"  # its metrics stop at step 2: not a finished run
        assert run.data.tags[TAG_PLAN] == "true"
        assert load_plan(run_id, tracking_uri=server.url) == opt.plan
        assert _history(client, run_id, METRIC_FROZEN) == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert logger.fallback_path is not None and logger.fallback_path.parent == tmp_path
    assert messages[0].endswith(f"the freeze plan was saved to {logger.fallback_path}")
    assert messages[1] == (
        f"safefreeze: MLflow at {server.url} answered again: run {run_id} was ended as FAILED and "
        "now holds the plan"
    )


def test_a_store_that_cannot_be_written_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan lands in the run when it can, else the fallback file, else the temporary directory."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "afile").write_text("")
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    client = mlflow.MlflowClient(uri)
    # A writable store whose artifact directory cannot be created (root ignores chmod, so the
    # directory sits under a regular file), and a fallback file that cannot be written either.
    experiment = client.create_experiment("broken", artifact_location=str(tmp_path / "afile" / "art"))
    model, opt = _hand()
    logger = MLflowFreezeLogger(
        opt, tracking_uri=uri, run_id=None, experiment_name="broken",
        fallback_path=tmp_path / "afile" / "plan.json",
    )  # fmt: skip
    _train_hand(model, opt, 6, logger)
    with pytest.warns(RuntimeWarning) as warned:
        logger.finish()
    messages = [str(w.message) for w in warned]
    assert messages[0].startswith(
        f"MLflow logging to {uri} failed while logging the plan: NotADirectoryError"
    )
    path = logger.fallback_path
    assert path == temp / f"safefreeze-plan-{logger.run_id}.json"
    assert path.read_text() == opt.plan.to_json()
    assert messages[1:] == _said(capsys)
    assert (
        f"the freeze plan was saved to {path} ({tmp_path}/afile/plan.json could not be written: "
        in (messages[1])
    )
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == logger.run_id and run.info.status == "FAILED"
    assert _history(client, run.info.run_id, METRIC_FROZEN)[-1] == (6, 3.0)  # metrics went in


def test_the_working_directory_read_only_sends_the_plan_to_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    url = f"http://127.0.0.1:{_free_port()}"
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    work.rmdir()  # a working directory that is gone: nothing can be created in it, even by root
    model, opt = _hand()
    with pytest.warns(RuntimeWarning):
        logger = MLflowFreezeLogger(opt, tracking_uri=url)
        _train_hand(model, opt, 6, logger)
        logger.finish()
    path = logger.fallback_path
    assert path is not None and path.parent == temp and path.read_text() == opt.plan.to_json()
    err = capsys.readouterr().err
    assert f"the freeze plan was saved to {path} (the working directory could not be written: " in err


@pytest.mark.parametrize("layout", ["under_a_file", "a_directory"])
def test_a_sqlite_store_that_cannot_be_opened_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.db").mkdir()
    db = tmp_path / "afile" / "sub" / "mlflow.db" if layout == "under_a_file" else tmp_path / "adir.db"
    uri = f"sqlite:///{db}"
    model, opt = _hand()
    start = time.monotonic()
    with pytest.warns(
        RuntimeWarning, match=rf"MLflow logging to {uri} failed while opening the tracking store"
    ):
        logger = MLflowFreezeLogger(opt, tracking_uri=uri)
    assert time.monotonic() - start < 5  # MLflow alone retries a sqlite file for ~100 s
    assert logger.run_id is None and logger.error is not None
    _train_hand(model, opt, 6, logger)
    with pytest.warns(RuntimeWarning, match=r"the freeze plan was saved to"):
        logger.finish()
    assert logger.fallback_path is not None and logger.fallback_path.parent == tmp_path
    assert FreezePlan.load(logger.fallback_path) == opt.plan
    assert "stays RUNNING" not in capsys.readouterr().err  # no run was ever started
    with pytest.raises(TrackingError, match=r"failed while opening the tracking store"):
        MLflowFreezeLogger(opt, tracking_uri=uri, strict=True)
    assert time.monotonic() - start < 10


def _log_main(argv: list[str]) -> int:
    """One of several processes opening a new store at once: wait for the go, then log a run."""
    ready, go = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)
    model, opt = _hand()
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    with MLflowFreezeLogger(opt, strict=True) as logger:
        _train_hand(model, opt, 6, logger)
    print(logger.run_id)
    return 0


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_log_their_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "log", str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()  # all three open the store that does not exist yet, at the same moment
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    run_ids = {out.split()[-1] for out, _ in outputs}
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(["0"])
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags[TAG_PLAN] == "true" for r in runs)
    assert not list(tmp_path.glob("safefreeze-plan-*.json"))  # no process fell back


# ---- processes and names ----------------------------------------------------------------


def test_only_rank_zero_logs(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlflow.MlflowClient(store)
    before = len(client.search_runs(["0"]))
    monkeypatch.setenv("RANK", "1")
    model, opt = _hand()
    with MLflowFreezeLogger(opt) as logger:
        _train_hand(model, opt, 6, logger)
    assert not logger.enabled and logger.run_id is None and logger.fallback_path is None
    assert opt.controller.callbacks == ()
    assert mlflow.active_run() is None
    assert len(client.search_runs(["0"])) == before
    # An initialized process group decides over the environment.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        logger = MLflowFreezeLogger(opt)
        assert logger.enabled and logger.run_id is not None
        logger.finish()
    finally:
        torch.distributed.destroy_process_group()
    assert len(client.search_runs(["0"])) == before + 1


def test_score_metric_names_are_valid_and_unique() -> None:
    keys = _metric_keys(["layers.0", "blk:0/lora", "a/../b", "a_b", "a b", "a:b", "/"])
    assert keys == {
        "layers.0": "layers.0",
        "blk:0/lora": "blk_0/lora",
        "a/../b": "a/b",
        "a_b": "a_b",
        "a b": "a b",
        "a:b": "a_b_2",
        "/": "_",
    }


def test_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    monkeypatch.delitem(sys.modules, "safefreeze.integrations.mlflow")
    with pytest.raises(ImportError, match=r"pip install 'safefreeze\[mlflow\]'"):
        importlib.import_module("safefreeze.integrations.mlflow")


if __name__ == "__main__":
    if sys.argv[1:2] == ["replay"]:
        sys.exit(_replay_main(sys.argv[2:]))
    if sys.argv[1:2] == ["log"]:
        sys.exit(_log_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} replay RUN_ID OUT | log READY_FILE GO_FILE")
