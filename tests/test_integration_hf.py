"""``safefreeze.integrations.hf`` on the real ``transformers.Trainer`` and ``trl.SFTTrainer``.

Tiny PEFT LoRA models on CPU; SAFE's warm-up and freeze steps fall inside each run. The
Trainer builds the optimizer from ``TrainingArguments.optim``; the tests check that SAFE
wraps that very optimizer, that frozen adapters stop changing and hold no optimizer state,
what lands in the logs and in MLflow, the plan in every checkpoint, and bit-identical
resumes and replays.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from models import peft_bert
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.optimization import Adafactor

from safefreeze import AdapterPattern, FreezePlan, SAFEConfig, SAFEOptimizer
from safefreeze.integrations.hf import (
    METRIC_FROZEN,
    METRIC_THRESHOLD,
    METRIC_TRAINABLE,
    PLAN_FILE,
    SAFETrainer,
    find_safe_optimizer,
    safe_logs,
    with_safe,
)

STEPS = 8
# Warm-up ends at optimizer step 2; the threshold ramps up to step 6, inside every run.
CONFIG = SAFEConfig(warmup_steps=2, freeze_end_step=6, tau_target=0.67)
LAYERS = 4  # 4 blocks x (query, value): 8 adapters, 4 freeze units
FIGURES = (METRIC_FROZEN, METRIC_TRAINABLE, METRIC_THRESHOLD)


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (64, 12), generator=g)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * 12] * 64,
            "labels": torch.randint(0, 3, (64,), generator=g).tolist(),
        }
    )


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "optim": "adamw_torch",
        "use_cpu": True,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(str(out), **settings)


class _Record(TrainerCallback):
    """Adapter weights and frozen adapters by global step: at the start and after every step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.frozen: dict[int, list[str]] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.on_step_end(args, state, control, **kwargs)  # a resumed run starts at its checkpoint's step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        safe = find_safe_optimizer(kwargs["optimizer"])
        assert safe is not None
        params = dict(kwargs["model"].named_parameters())
        names = [n for pair in safe.controller.pairs for n in pair.param_names]
        self.weights[state.global_step] = {n: params[n].detach().clone() for n in names}
        self.frozen[state.global_step] = list(safe.frozen_adapters)


def _train(
    out: Path,
    data: Dataset,
    *,
    resume: Path | None = None,
    safe_plan: FreezePlan | None = None,
    **overrides: Any,
) -> tuple[SAFETrainer, torch.nn.Module, _Record]:
    model = peft_bert(layers=LAYERS, seed=0)
    record = _Record()
    trainer = SAFETrainer(
        model=model,
        args=_args(out, **overrides),
        train_dataset=data,
        callbacks=[record],
        safe_config=None if safe_plan is not None else CONFIG,
        safe_plan=safe_plan,
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, model, record


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers that differ (empty: bit-identical)."""
    pa, pb = dict(a.state_dict(keep_vars=True)), dict(b.state_dict(keep_vars=True))
    assert pa.keys() == pb.keys()
    return [n for n in pa if not torch.equal(pa[n], pb[n]) or pa[n].requires_grad != pb[n].requires_grad]


@pytest.mark.parametrize(
    ("optim", "inner_cls"),
    [
        ("adamw_torch", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("adafactor", Adafactor),
        ("adagrad", torch.optim.Adagrad),
    ],
)
def test_wraps_the_optimizer_the_trainer_builds_and_freezes_for_real(
    tmp_path: Path, data: Dataset, optim: str, inner_cls: type[torch.optim.Optimizer]
) -> None:
    trainer, model, record = _train(tmp_path, data, optim=optim)
    safe = trainer.safe_optimizer
    assert isinstance(safe, SAFEOptimizer) and type(safe.optimizer) is inner_cls
    # Accelerate wraps it; the Trainer steps SAFE through that wrapper.
    assert trainer.optimizer is not safe and find_safe_optimizer(trainer.optimizer) is safe
    assert safe.controller.step == trainer.state.global_step == STEPS
    frozen = safe.frozen_adapters
    assert 0 < len(frozen) < len(safe.controller.pairs)

    params = dict(model.named_parameters())
    held = {id(p) for g in safe.param_groups for p in g["params"]}
    with_state = {id(p) for p in safe.state}
    freeze_steps = safe.plan.adapter_freeze_steps
    for pair in safe.controller.pairs:
        for name in pair.param_names:
            p = params[name]
            if pair.name in frozen:
                step = freeze_steps[pair.name]
                assert CONFIG.warmup_steps < step <= CONFIG.freeze_end_step
                assert not p.requires_grad and p.grad is None
                assert id(p) not in held and id(p) not in with_state
                # Unchanged from the step it froze at to the end of the run.
                for later in range(step, STEPS + 1):
                    assert torch.equal(record.weights[later][name], p), (name, later)
            else:
                assert p.requires_grad and id(p) in held
                if optim != "sgd":  # plain SGD keeps no state
                    assert id(p) in with_state
    # The adapters that still train did change after the freezes.
    trained = [
        n
        for pair in safe.controller.pairs
        if pair.name not in frozen
        for n in pair.param_names
        if not torch.equal(record.weights[STEPS - 1][n], params[n])
    ]
    assert trained


def test_logs_carry_safe_figures_and_mlflow_stores_them(
    tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-safe")
    # The Trainer's MLflowCallback sets MLflow's process-wide URI and experiment: undo both after.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(None))
    trainer, _, _ = _train(tmp_path / "out", data, report_to=["mlflow"])
    plan = trainer.safe_optimizer.plan
    assert plan.events  # something froze inside the run

    def expected(step: int) -> dict[str, float]:
        return {
            METRIC_FROZEN: len(plan.frozen_adapters_at(step)),
            METRIC_TRAINABLE: plan.trainable_params_at(step),
            METRIC_THRESHOLD: plan.threshold_at(step),
        }

    per_step = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in per_step] == list(range(1, STEPS + 1))
    for entry in per_step:
        assert {k: entry[k] for k in FIGURES} == expected(entry["step"])
    assert expected(1)[METRIC_TRAINABLE] == 8 * 2 * 4 * 32  # 8 adapters of r=4, hidden 32
    assert expected(STEPS)[METRIC_FROZEN] == len(trainer.safe_optimizer.frozen_adapters)
    # The closing summary (train_runtime, ...) carries them too.
    assert {k: trainer.state.log_history[-1][k] for k in FIGURES} == expected(STEPS)

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("hf-safe")
    (run,) = client.search_runs([experiment.experiment_id])
    for key in FIGURES:
        history = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {(s, float(expected(s)[key])) for s in range(1, STEPS + 1)}, key


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path, data: Dataset) -> None:
    trainer, _, record = _train(tmp_path, data, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    safe = trainer.safe_optimizer
    plan = safe.plan
    assert safe.controller.step == trainer.state.global_step == STEPS  # not 2 * STEPS micro-batches
    assert plan.scored_at == CONFIG.warmup_steps
    assert plan.events and all(CONFIG.warmup_steps < e.step <= CONFIG.freeze_end_step for e in plan.events)
    # What was frozen after each optimizer step is what the plan says for that step.
    assert record.frozen == {s: plan.frozen_adapters_at(s) for s in range(STEPS + 1)}


@pytest.fixture(scope="module")
def full_run(
    tmp_path_factory: pytest.TempPathFactory, data: Dataset
) -> tuple[Path, SAFETrainer, torch.nn.Module]:
    """An uninterrupted run that saves a checkpoint after every optimizer step."""
    out = tmp_path_factory.mktemp("full")
    trainer, model, _ = _train(out, data, save_strategy="steps", save_steps=1)
    return out, trainer, model


def test_every_checkpoint_folder_holds_the_plan_so_far(
    full_run: tuple[Path, SAFETrainer, torch.nn.Module],
) -> None:
    out, trainer, _ = full_run
    plan = trainer.safe_optimizer.plan
    for step in range(1, STEPS + 1):
        saved = FreezePlan.load(out / f"checkpoint-{step}" / PLAN_FILE)
        assert saved.events == [e for e in plan.events if e.step <= step]
        assert saved.scored_at == (None if step < CONFIG.warmup_steps else CONFIG.warmup_steps)
        assert saved.fingerprint == plan.fingerprint
    assert FreezePlan.load(out / f"checkpoint-{STEPS}" / PLAN_FILE) == plan


@pytest.mark.parametrize("when", ["warm-up", "scored, nothing frozen", "after the first freeze"])
def test_resume_restores_the_frozen_set_and_ends_bit_identical(
    tmp_path: Path, data: Dataset, full_run: tuple[Path, SAFETrainer, torch.nn.Module], when: str
) -> None:
    out, full, full_model = full_run
    first = full.safe_optimizer.plan.events[0].step
    step = {"warm-up": 1, "scored, nothing frozen": first - 1, "after the first freeze": first}[when]
    checkpoint = out / f"checkpoint-{step}"
    frozen_then = FreezePlan.load(checkpoint / PLAN_FILE).frozen_adapters_at(step)
    assert bool(frozen_then) == (when == "after the first freeze")

    resumed, model, record = _train(tmp_path, data, resume=checkpoint)
    safe = resumed.safe_optimizer
    # The checkpoint's freezes were back in place before the first resumed step.
    assert min(record.frozen) == step and record.frozen[step] == frozen_then
    assert safe.controller.step == STEPS
    assert safe.plan == full.safe_optimizer.plan
    assert safe.frozen_adapters == full.safe_optimizer.frozen_adapters
    assert _same_weights(model, full_model) == []


def test_replaying_a_checkpoint_plan_reproduces_the_run(
    tmp_path: Path, data: Dataset, full_run: tuple[Path, SAFETrainer, torch.nn.Module]
) -> None:
    out, full, full_model = full_run
    plan = FreezePlan.load(out / f"checkpoint-{STEPS}" / PLAN_FILE)
    replay, model, _ = _train(tmp_path, data, safe_plan=plan)
    assert replay.safe_optimizer.controller.replaying and not replay.safe_optimizer.controller.scoring
    assert replay.safe_optimizer.frozen_adapters == full.safe_optimizer.frozen_adapters
    assert _same_weights(model, full_model) == []  # scoring never touched training


def test_a_passed_in_safe_optimizer_is_used_as_is(tmp_path: Path, data: Dataset) -> None:
    model = peft_bert(layers=LAYERS, seed=0)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with SAFEOptimizer(inner, model, CONFIG) as optimizer:
        trainer = SAFETrainer(
            model=model, args=_args(tmp_path, max_steps=4), train_dataset=data, optimizers=(optimizer, None)
        )
        trainer.train()
        assert trainer.safe_optimizer is optimizer and optimizer.optimizer is inner
        assert optimizer.controller.step == 4
        last = [e for e in trainer.state.log_history if "loss" in e][-1]
        assert {k: last[k] for k in FIGURES} == safe_logs(optimizer)

        with pytest.raises(TypeError, match=r"got a SAFEOptimizer .* and safe_config"):
            SAFETrainer(
                model=model,
                args=_args(tmp_path),
                train_dataset=data,
                optimizers=(optimizer, None),
                safe_config=CONFIG,
            )


def test_bad_arguments_say_what_was_expected(tmp_path: Path, data: Dataset) -> None:
    model = peft_bert(layers=2, seed=0)
    with pytest.raises(TypeError, match=r"safe_config must be a SAFEConfig or None, got dict"):
        SAFETrainer(model=model, args=_args(tmp_path), train_dataset=data, safe_config={"warmup_steps": 2})
    patterns: Any = [AdapterPattern(), "lora_A"]
    with pytest.raises(TypeError, match=r"safe_pattern must be an AdapterPattern \(or a list of them\)"):
        SAFETrainer(model=model, args=_args(tmp_path), train_dataset=data, safe_pattern=patterns)
    with pytest.raises(
        TypeError, match=r"with_safe takes a transformers.Trainer subclass, got <class 'int'>"
    ):
        with_safe(int)  # type: ignore[arg-type]

    class TwoOptimizers:
        """What an optimizer factory may build: optimizers side by side, not a torch Optimizer."""

        def __init__(self, model: torch.nn.Module) -> None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.optimizers = [torch.optim.SGD(trainable[:2], lr=0.1), torch.optim.SGD(trainable[2:], lr=0.1)]

    class Factory:  # the Trainer instantiates a factory, then calls it with the model
        def __call__(self, model: torch.nn.Module, **kwargs: Any) -> TwoOptimizers:
            return TwoOptimizers(model)

    trainer = SAFETrainer(
        model=model, args=_args(tmp_path), train_dataset=data, optimizer_cls_and_kwargs=(Factory, {})
    )
    with pytest.raises(
        TypeError,
        match=r"SAFE wraps a torch.optim.Optimizer, but the trainer built a TwoOptimizers "
        r"\(TrainingArguments.optim='adamw_torch'\)",
    ):
        trainer.create_optimizer()
    assert trainer.safe_optimizer is None


def test_with_safe_builds_one_class_per_trainer_class() -> None:
    class MyTrainer(Trainer):  # type: ignore[misc]
        pass

    cls = with_safe(MyTrainer)
    assert cls.__name__ == "SAFEMyTrainer" and issubclass(cls, MyTrainer)
    assert with_safe(MyTrainer) is cls and with_safe(cls) is cls
    assert with_safe(Trainer) is SAFETrainer and issubclass(SAFETrainer, Trainer)


# ---- TRL ---------------------------------------------------------------------------------


def _tiny_causal_lm() -> tuple[torch.nn.Module, Any, Dataset]:
    """A 4-layer Llama-style LM, a word-level tokenizer built in memory and a text dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "cat",
        "dog",
        "bird",
        "sat",
        "ran",
        "flew",
        "on",
        "under",
        "mat",
        "log",
        "tree",
        "fast",
    ]
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (10,), generator=g)) for _ in range(48)]
    return model, tokenizer, Dataset.from_dict({"text": texts})


def _sft(out: Path, *, resume: Path | None = None) -> tuple[Any, torch.nn.Module]:
    from peft import LoraConfig
    from trl import SFTConfig

    from safefreeze.integrations.hf import SAFESFTTrainer

    model, tokenizer, texts = _tiny_causal_lm()
    args = SFTConfig(
        str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        seed=0,
        max_length=16,
        # SFTConfig checkpoints activations by default, which makes the embeddings' output require
        # grad: autograd then walks through the frozen layers and SAFE warns that prefix savings are gone.
        activation_checkpointing=False,
    )
    trainer = SAFESFTTrainer(
        model=model,
        args=args,
        train_dataset=texts,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        safe_config=SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.67),
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer, trainer.model


def test_sft_trainer_trains_with_safe_and_resumes_bit_identical(tmp_path: Path) -> None:
    import trl

    from safefreeze.integrations.hf import SAFESFTTrainer

    assert issubclass(SAFESFTTrainer, trl.SFTTrainer) and with_safe(trl.SFTTrainer) is SAFESFTTrainer
    trainer, model = _sft(tmp_path / "full")
    safe = trainer.safe_optimizer
    assert type(safe.optimizer) is torch.optim.AdamW
    assert safe.controller.step == trainer.state.global_step == 6
    assert safe.frozen_adapters and safe.plan.events[0].step > 2
    assert FreezePlan.load(tmp_path / "full" / "checkpoint-6" / PLAN_FILE) == safe.plan
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    assert {k: last[k] for k in FIGURES} == safe_logs(safe)
    assert "mean_token_accuracy" in last  # TRL's own figures still there
    params = dict(model.named_parameters())
    frozen = [
        n for pair in safe.controller.pairs if pair.name in safe.frozen_adapters for n in pair.param_names
    ]
    with_state = {id(p) for p in safe.state}
    assert frozen and all(not params[n].requires_grad and id(params[n]) not in with_state for n in frozen)

    resumed, resumed_model = _sft(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-3")
    assert resumed.safe_optimizer.plan == safe.plan
    assert _same_weights(resumed_model, model) == []


# ---- missing dependencies -----------------------------------------------------------------


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    monkeypatch.delitem(sys.modules, "safefreeze.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'safefreeze\[hf\]'"):
        importlib.import_module("safefreeze.integrations.hf")


def test_missing_trl_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import safefreeze.integrations.hf as hf

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ModuleNotFoundError, match=r"SAFESFTTrainer needs TRL.*pip install trl"):
        hf.SAFESFTTrainer  # noqa: B018
    with pytest.raises(AttributeError, match=r"has no attribute 'SAFENothing'"):
        hf.SAFENothing  # noqa: B018
