"""``SAFECallback`` in a real ``lightning.Trainer`` on CPU: wrapping, logged figures,
checkpoints and bit-identical resume, gradient accumulation, replay, and the awkward paths.

The network is a tiny BERT classifier with PEFT LoRA on query and value (3 layers, so 6
adapters), dropout off and data in a fixed order, so that every run is a pure function of
its checkpoint. One uninterrupted recording run per module writes a checkpoint every 3
optimizer steps (each at the end of an epoch of 3 batches) and a CSV log; the other tests
resume, replay or compare against it.
"""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safefreeze import FreezePlan, PlanError, SAFEConfig, SAFEOptimizer
from safefreeze.integrations.lightning import (
    METRIC_FROZEN,
    METRIC_THRESHOLD,
    METRIC_TRAINABLE,
    SAFECallback,
    load_plan,
)

pytestmark = pytest.mark.filterwarnings(
    # Lightning's advice for real data loaders and checkpoint callbacks; not what is tested here.
    "ignore:The '.*dataloader' does not have many workers",
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

# Warm-up ends at step 4, the threshold rises until step 8; 12 steps in all.
CONFIG = SAFEConfig(warmup_steps=4, freeze_end_step=8, tau_target=0.6, order="depth", units="adapter")
MAX_STEPS = 12
BATCHES_PER_EPOCH = 3
# Checkpoints: inside the warm-up, and after the first freeze (step 5) but before the last one.
WARMUP_CKPT, FREEZING_CKPT = "epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"


# ---- the model and the runs ----------------------------------------------------------------


def _network(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(BertForSequenceClassification(config), lora)


class Classifier(L.LightningModule):
    """A LightningModule holding the PEFT network as ``self.net``, trained with AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _network()
        self.batches = 0

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.net(input_ids=input_ids, attention_mask=mask, labels=labels)
        return out.loss  # type: ignore[no-any-return]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches += 1
        return self(*batch)  # type: ignore[no-any-return]

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _data(batch_size: int = 4) -> DataLoader[tuple[torch.Tensor, ...]]:
    rows = BATCHES_PER_EPOCH * 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (rows, 8), generator=g)  # (N, T)
    # Sequences of 4 to 8 tokens, padded with id 0 to 8.
    mask = torch.arange(8) < torch.randint(4, 9, (rows, 1), generator=g)  # (N, T)
    labels = torch.randint(0, 2, (rows,), generator=g)
    return DataLoader(TensorDataset(ids * mask, mask.long(), labels), batch_size=batch_size)


def _trainer(callbacks: list[Any], *, max_steps: int = MAX_STEPS, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _fit(
    callback: SAFECallback,
    *,
    module: L.LightningModule | None = None,
    ckpt_path: Path | None = None,
    **kw: Any,
) -> tuple[L.LightningModule, L.Trainer]:
    module = module or Classifier()
    trainer = _trainer([callback], **kw)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, trainer


class Reference:
    """The uninterrupted recording run: its module, callback, checkpoints and CSV log."""

    def __init__(self, root: Path) -> None:
        self.callback = SAFECallback(CONFIG)
        self.checkpoints = root / "checkpoints"
        saver = ModelCheckpoint(
            dirpath=self.checkpoints, every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1
        )
        self.logger = CSVLogger(root / "logs", name="run")
        self.module = Classifier()
        self.trainer = _trainer([self.callback, saver], logger=self.logger, log_every_n_steps=1)
        self.trainer.fit(self.module, _data())
        self.plan = self.callback.plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(tmp_path_factory.mktemp("lightning"))


def _optimizer(callback: SAFECallback) -> SAFEOptimizer:
    optimizer = callback.optimizer
    assert isinstance(optimizer, SAFEOptimizer)
    return optimizer


def _assert_same_run(module: nn.Module, reference: nn.Module) -> None:
    """Every parameter bit-identical and trainable exactly where the reference's is."""
    mine, theirs = dict(module.named_parameters()), dict(reference.named_parameters())
    assert list(mine) == list(theirs)
    differ = [n for n, p in theirs.items() if not torch.equal(p, mine[n])]
    assert differ == []
    flags = [n for n, p in theirs.items() if p.requires_grad != mine[n].requires_grad]
    assert flags == []


def _assert_frozen_for_real(module: nn.Module, optimizer: SAFEOptimizer) -> None:
    """Frozen adapter params take no grad and hold no optimizer state; the others train."""
    params = dict(module.named_parameters())
    frozen = {
        n
        for pair in optimizer.controller.pairs
        if pair.name in optimizer.frozen_adapters
        for n in pair.param_names
    }
    assert frozen, "the run froze nothing: the test would prove nothing"
    assert all(not params[n].requires_grad and params[n].grad is None for n in frozen)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    in_state = {id(p) for p in optimizer.state}
    assert not any(id(params[n]) in held | in_state for n in frozen)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(id(params[n]) in held and id(params[n]) in in_state for n in trainable)


# ---- wrapping and the recorded run -----------------------------------------------------


def test_the_callback_wraps_the_optimizer_and_freezes_within_the_run(reference: Reference) -> None:
    optimizer = _optimizer(reference.callback)
    assert reference.trainer.optimizers == [optimizer]
    assert reference.trainer.global_step == optimizer.controller.step == MAX_STEPS
    # The LightningModule is the wrapped model: adapter names start with its attribute.
    assert len(optimizer.controller.pairs) == 6
    assert all(p.name.startswith("net.base_model.model.bert.encoder.layer.") for p in reference.plan.adapters)
    assert reference.plan.scored_at == CONFIG.warmup_steps
    steps = [e.step for e in reference.plan.events]
    assert steps and CONFIG.warmup_steps < steps[0] and steps[-1] <= CONFIG.freeze_end_step
    assert 0 < len(optimizer.frozen_adapters) < 6
    _assert_frozen_for_real(reference.module, optimizer)
    # Fitting ended: SAFE's hooks are gone and the model can be wrapped again.
    assert optimizer.controller.closed
    assert not optimizer.controller.scoring


def test_figures_reach_callback_metrics_and_a_csv_logger(reference: Reference) -> None:
    plan = reference.plan
    with open(Path(reference.logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r[METRIC_FROZEN]]
    # Lightning's step s is the batch trained after s optimizer steps: the plan's state at s.
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))
    for row in rows:
        step = int(row["step"])
        assert float(row[METRIC_FROZEN]) == len(plan.frozen_adapters_at(step))
        assert float(row[METRIC_TRAINABLE]) == plan.trainable_params_at(step)
        assert float(row[METRIC_THRESHOLD]) == plan.threshold_at(step)
    # The log shows the freezes: the counts before the first one and after the last one.
    first, last = plan.events[0].step, plan.events[-1].step
    assert float(rows[first - 1][METRIC_FROZEN]) == 0 < float(rows[last][METRIC_FROZEN])
    metrics = reference.trainer.callback_metrics
    assert {METRIC_FROZEN, METRIC_TRAINABLE, METRIC_THRESHOLD} <= set(metrics)
    assert metrics[METRIC_FROZEN].item() == len(plan.frozen_adapters_at(MAX_STEPS - 1))
    assert metrics[METRIC_TRAINABLE].item() == plan.trainable_params_at(MAX_STEPS - 1)
    assert metrics[METRIC_THRESHOLD].item() == CONFIG.tau_target


def test_the_plan_is_in_every_checkpoint(reference: Reference) -> None:
    names = sorted(p.name for p in reference.checkpoints.iterdir())
    assert names == [f"epoch={e}-step={3 * (e + 1)}.ckpt" for e in range(4)]
    warmup = load_plan(reference.checkpoints / WARMUP_CKPT)
    assert warmup.scored_at is None and warmup.events == []
    freezing = load_plan(reference.checkpoints / FREEZING_CKPT)
    assert freezing.events == [e for e in reference.plan.events if e.step <= 6] != reference.plan.events
    final = load_plan(reference.checkpoints / "epoch=3-step=12.ckpt")
    assert final.to_dict() == reference.plan.to_dict()


# ---- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [WARMUP_CKPT, FREEZING_CKPT], ids=["in-warmup", "after-first-freeze"])
def test_resume_with_ckpt_path_is_bit_identical(reference: Reference, checkpoint: str) -> None:
    callback = SAFECallback(CONFIG)
    module, trainer = _fit(callback, ckpt_path=reference.checkpoints / checkpoint)
    optimizer = _optimizer(callback)
    assert trainer.global_step == optimizer.controller.step == MAX_STEPS
    assert module.batches == MAX_STEPS - int(checkpoint.split("step=")[1].split(".")[0])
    assert callback.plan.to_dict() == reference.plan.to_dict()
    _assert_same_run(module, reference.module)
    _assert_frozen_for_real(module, optimizer)


def test_freezes_are_reapplied_before_the_first_resumed_step(reference: Reference) -> None:
    seen: list[tuple[list[str], int, int, int, int]] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            optimizer = _optimizer(safe)
            params = dict(pl_module.named_parameters())
            frozen = [
                params[n]
                for p in optimizer.controller.pairs
                if p.name in optimizer.frozen_adapters
                for n in p.param_names
            ]
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            in_state = {id(p) for p in optimizer.state}
            seen.append(
                (
                    optimizer.frozen_adapters,
                    len(frozen),
                    sum(p.requires_grad for p in frozen),
                    sum(id(p) in held for p in frozen),
                    sum(id(p) in in_state for p in frozen),
                )
            )

    safe = SAFECallback(CONFIG)
    trainer = _trainer([safe, Probe()])
    trainer.fit(Classifier(), _data(), ckpt_path=reference.checkpoints / FREEZING_CKPT)
    expected = load_plan(reference.checkpoints / FREEZING_CKPT).frozen_adapters_at(6)
    assert expected
    # Before the first resumed step: frozen, out of their groups and without optimizer state.
    assert seen == [(expected, 2 * len(expected), 0, 0, 0)]


# ---- accumulation, replay, a SAFEOptimizer of one's own -----------------------------------


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.6, order="depth", units="adapter")
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    callback = SAFECallback(config)
    # Batches of 2 accumulated in pairs: 6 batches, 3 optimizer steps per epoch.
    module = Classifier()
    trainer = _trainer([callback, saver], max_steps=6, accumulate_grad_batches=2)
    trainer.fit(module, _data(batch_size=2))
    assert module.batches == 12
    assert trainer.global_step == _optimizer(callback).controller.step == 6
    assert callback.plan.scored_at == 2
    assert callback.plan.events and all(2 < e.step <= 4 for e in callback.plan.events)
    # A checkpoint taken between optimizer steps' batches resumes bit for bit, too.
    again = SAFECallback(config)
    resumed = Classifier()
    _trainer([again], max_steps=6, accumulate_grad_batches=2).fit(
        resumed, _data(batch_size=2), ckpt_path=tmp_path / "epoch=0-step=3.ckpt"
    )
    assert resumed.batches == 6
    assert again.plan.to_dict() == callback.plan.to_dict()
    _assert_same_run(resumed, module)


def test_a_plan_read_from_a_checkpoint_replays_bit_identically(reference: Reference) -> None:
    plan = load_plan(reference.checkpoints / "epoch=3-step=12.ckpt")
    callback = SAFECallback(plan=plan)
    module, _ = _fit(callback)
    optimizer = _optimizer(callback)
    assert optimizer.controller.replaying
    assert [(e.step, e.units) for e in callback.plan.events] == [(e.step, e.units) for e in plan.events]
    _assert_same_run(module, reference.module)


def test_mask_fn_reaches_the_scoring(reference: Reference) -> None:
    calls: list[int] = []

    def from_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        calls.append(1)
        return args[1].bool()  # Classifier.forward(input_ids, mask, labels)

    explicit = SAFECallback(CONFIG, mask_fn=from_batch)
    _fit(explicit)
    assert calls
    # The same mask as the one found in the network's attention_mask: the same scores.
    assert explicit.plan.to_dict() == reference.plan.to_dict()
    # Declaring the batches unpadded scores the padding tokens too: other scores.
    unpadded = SAFECallback(CONFIG, mask_fn=lambda args, kwargs: None)
    _fit(unpadded)
    assert unpadded.plan.raw_scores != reference.plan.raw_scores


class OwnOptimizer(Classifier):
    """Returns its own SAFEOptimizer from configure_optimizers."""

    def configure_optimizers(self) -> Any:
        inner = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        self.safe = SAFEOptimizer(inner, self, CONFIG)
        return self.safe


def test_a_safe_optimizer_from_configure_optimizers_is_adopted(reference: Reference) -> None:
    callback = SAFECallback()
    module = OwnOptimizer()
    _, trainer = _fit(callback, module=module)
    assert callback.optimizer is module.safe
    assert trainer.optimizers == [module.safe]
    assert callback.plan.to_dict() == reference.plan.to_dict()
    assert trainer.callback_metrics[METRIC_FROZEN].item() == len(
        reference.plan.frozen_adapters_at(MAX_STEPS - 1)
    )
    _assert_same_run(module, reference.module)
    assert module.safe.controller.closed


def test_a_safe_optimizer_and_callback_settings_together_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"returned a SAFEOptimizer, and SAFECallback was given config as well"
    ):
        _fit(SAFECallback(CONFIG), module=OwnOptimizer())


class Scheduled(Classifier):
    """AdamW with an LR scheduler built on the plain optimizer."""

    def configure_optimizers(self) -> Any:
        inner = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 / (1 + step))
        return {"optimizer": inner, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.filterwarnings(r"error:Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
def test_an_lr_scheduler_on_the_plain_optimizer_keeps_stepping(reference: Reference) -> None:
    callback = SAFECallback(CONFIG)
    module, trainer = _fit(callback, module=Scheduled())
    optimizer = _optimizer(callback)
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is optimizer.optimizer
    assert config.scheduler.last_epoch == MAX_STEPS
    assert [g["lr"] for g in optimizer.param_groups] == [
        1e-2 * (1.0 / (1 + MAX_STEPS))
    ]  # as LambdaLR computes it
    assert [(e.step, e.units) for e in callback.plan.events] == [
        (e.step, e.units) for e in reference.plan.events
    ]
    _assert_frozen_for_real(module, optimizer)


def test_log_figures_false_logs_nothing() -> None:
    _, trainer = _fit(SAFECallback(CONFIG, log_figures=False))
    assert not any(k.startswith("safefreeze/") for k in trainer.callback_metrics)


class Manual(Classifier):
    """Manual optimization, with ``optimizers`` optimizers."""

    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.count = optimizers

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:  # type: ignore[override]
        self.batches += 1
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(self(*batch))
        optimizer.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=1e-2) for _ in range(self.count)]


def test_manual_optimization_steps_the_wrapper(reference: Reference) -> None:
    callback = SAFECallback(CONFIG)
    module, trainer = _fit(callback, module=Manual())
    assert trainer.global_step == _optimizer(callback).controller.step == MAX_STEPS
    assert [(e.step, e.units) for e in callback.plan.events] == [
        (e.step, e.units) for e in reference.plan.events
    ]
    _assert_frozen_for_real(module, _optimizer(callback))


def test_several_optimizers_without_a_safe_one_are_refused() -> None:
    with pytest.raises(ValueError, match=r"wraps the one optimizer of configure_optimizers, got 2"):
        _fit(SAFECallback(CONFIG), module=Manual(optimizers=2))


# ---- the awkward paths --------------------------------------------------------------------


def test_a_failed_fit_releases_the_model(reference: Reference) -> None:
    class Failing(Classifier):
        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.trainer.global_step == 2:
                raise RuntimeError("the data went bad at step 2")
            return super().training_step(batch, batch_idx)

    callback = SAFECallback(CONFIG)
    module = Failing()
    with pytest.raises(RuntimeError, match="the data went bad at step 2"):
        _fit(callback, module=module)
    assert _optimizer(callback).controller.closed
    # No live engine is left on the adapters: another optimizer may drive them.
    with SAFEOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), module, CONFIG) as again:
        assert len(again.controller.pairs) == 6


def test_config_and_plan_together_are_refused(reference: Reference) -> None:
    with pytest.raises(ValueError, match=r"both a config and a plan"):
        SAFECallback(CONFIG, plan=reference.plan)


def test_an_unknown_option_is_refused_when_the_callback_is_built() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['warmup_steps'\]"):
        SAFECallback(warmup_steps=4)


def test_the_plan_before_any_fit_is_an_error() -> None:
    callback = SAFECallback(CONFIG)
    assert callback.optimizer is None
    assert callback.state_dict() == {}
    with pytest.raises(RuntimeError, match=r"no plan before trainer.fit"):
        _ = callback.plan


@pytest.mark.parametrize(
    ("checkpoint", "words"),
    [
        ({"state_dict": {}}, "found 0 (callback entries: [])"),
        ({"callbacks": {"ModelCheckpoint{}": {}}}, "found 0 (callback entries: ['ModelCheckpoint{}'])"),
    ],
    ids=["no-callbacks", "no-safe-entry"],
)
def test_load_plan_names_what_the_checkpoint_lacks(checkpoint: dict[str, Any], words: str) -> None:
    with pytest.raises(PlanError, match=r"expected one SAFECallback entry") as err:
        load_plan(checkpoint)
    assert words in str(err.value)


def test_load_plan_refuses_a_checkpoint_the_safe_loader_refuses(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"callbacks": {}, "hyper_parameters": {"loss": nn.MSELoss()}}, path)
    with pytest.raises(PlanError, match=r"weights_only=True\) refused the checkpoint"):
        load_plan(path)
    with pytest.raises(PlanError, match=r"expected one SAFECallback entry"):
        load_plan(torch.load(path, weights_only=False))


def test_load_plan_reads_a_loaded_checkpoint_dict(reference: Reference) -> None:
    data = torch.load(reference.checkpoints / FREEZING_CKPT, weights_only=True)
    assert (
        load_plan(data).to_dict() == FreezePlan.from_dict(data["callbacks"]["SAFECallback"]["plan"]).to_dict()
    )


def test_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)  # as if lightning were not installed
    monkeypatch.delitem(sys.modules, "safefreeze.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'safefreeze\[lightning\]'"):
        importlib.import_module("safefreeze.integrations.lightning")
