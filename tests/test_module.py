"""Tests of `lightning_peft.module.CausalLMModule` and `lightning_peft.metrics`."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_peft.metrics import ExactMatch
from lightning_peft.module import CausalLMModule, WarmupDecay
from lightning_peft.tasks import ArithmeticTask, Data2TextTask

VAL_KEYS = {"val/loss", "val/ppl", "val/token_acc", "val/exact_match"}


def _trainer(**kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    args.update(kwargs)
    return L.Trainer(**args)


def _task(model_dir: str, **kwargs) -> ArithmeticTask:
    # The micro model's context is 64 tokens: long prompts are cut from the left.
    args = dict(num_train=40, num_val=8, num_test=8, batch_size=8, max_length=64)
    args.update(kwargs)
    return ArithmeticTask(model_dir, **args)


def test_fit_then_validate_and_test_log_every_metric(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir, lr=3e-3, max_new_tokens=8)
    dm = _task(micro_model_dir)
    trainer = _trainer(max_steps=5)
    before = trainer.validate(module, dm, verbose=False)[0]
    trainer.fit(module, dm)
    assert trainer.global_step == 5
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    after = trainer.validate(module, dm, verbose=False)[0]
    tested = trainer.test(module, dm, verbose=False)[0]
    assert set(before) == set(after) == VAL_KEYS
    assert set(tested) == {k.replace("val/", "test/") for k in VAL_KEYS}
    assert all(math.isfinite(v) for v in (*after.values(), *tested.values()))
    assert after["val/loss"] < before["val/loss"]  # 5 steps at lr 3e-3 already fit the format
    # One val batch: HF's (shifted) loss and torchmetrics' perplexity on shifted logits agree.
    assert math.log(after["val/ppl"]) == pytest.approx(after["val/loss"], rel=1e-4)
    assert 0.0 <= after["val/token_acc"] <= 1.0 and 0.0 <= after["val/exact_match"] <= 1.0


def test_exact_match_scores_the_extracted_answers(micro_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = CausalLMModule(micro_model_dir)
    dm = _task(micro_model_dir, eval_batch_size=4)
    answers = [e.answer for e in dm.get_examples()["val"]]

    # Generations in the awkward shapes models produce: the right answer buried in text
    # for the first half, a wrong number for the second half.
    outputs = iter(
        [f" 1 + 1 = 2. The answer is {a}.\nQuestion: more" for a in answers[:4]]
        + [f" The answer is {int(a) + 1}" for a in answers[4:]]
    )
    monkeypatch.setattr(module, "generate_completions", lambda ids, mask: [next(outputs) for _ in range(len(ids))])
    result = _trainer().validate(module, dm, verbose=False)[0]
    assert result["val/exact_match"] == 0.5


def test_examples_longer_than_the_context_warn(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir)
    dm = _task(micro_model_dir, num_train=8, max_length=128)  # the micro model's context is 64
    with pytest.warns(UserWarning, match=r"longest example has \d+ tokens, more than .*max_position_embeddings=64"):
        _trainer(max_steps=1, limit_val_batches=0).fit(module, dm)


def test_generate_on_val_false_skips_exact_match(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir, generate_on_val=False)
    result = _trainer().validate(module, _task(micro_model_dir), verbose=False)[0]
    assert set(result) == VAL_KEYS - {"val/exact_match"}


def test_adapter_callback_injects_after_configure_model(micro_model_dir: str) -> None:
    import lightning_peft

    module = CausalLMModule(micro_model_dir, max_new_tokens=4)
    trainer = _trainer(max_steps=2, limit_val_batches=0, callbacks=[lightning_peft.LoRA(r=4)])
    trainer.fit(module, _task(micro_model_dir, num_train=16))
    names = {id(p): n for n, p in module.named_parameters()}
    optimized = [names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert optimized and all("lora_" in n for n in optimized)  # only the adapter trains
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(optimized)


@pytest.fixture(scope="module")
def random_llama_dir(micro_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The micro llama architecture with large random weights: varied, tie-free generations."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(micro_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("random_llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(micro_model_dir).save_pretrained(out)
    return str(out)


def test_batched_left_padded_generation_matches_one_by_one(random_llama_dir: str) -> None:
    module = CausalLMModule(random_llama_dir, max_new_tokens=6)
    module.configure_model()
    module.eval()
    dm = Data2TextTask(random_llama_dir, num_train=10, num_val=6, num_test=6, eval_batch_size=6)
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["prompt_attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    batched = module.generate_completions(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    single = []
    for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"]):
        real = ids[mask.bool()][None]  # (1, P_i)
        single += module.generate_completions(real, torch.ones_like(real))
    assert batched == single
    assert len(set(batched)) > 1


def test_configure_model_is_lazy_and_idempotent(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir)
    assert module.model is None and module.tokenizer is None
    with pytest.raises(RuntimeError, match="built in configure_model"):
        module(torch.zeros(1, 3, dtype=torch.long))
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first
    assert module.hparams.model == micro_model_dir and module.hparams.lr == 3e-4


def test_optimizer_covers_only_trainable_parameters(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir, weight_decay=0.1)
    module.configure_model()
    for p in module.parameters():
        p.requires_grad_(False)
    head = module.model.get_output_embeddings().weight
    norm = module.model.model.norm.weight
    head.requires_grad_(True)
    norm.requires_grad_(True)
    opt = module.configure_optimizers()["optimizer"]
    groups = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert groups == {id(head): 0.1, id(norm): 0.0}  # no decay on vectors
    norm.requires_grad_(False)
    head.requires_grad_(False)
    with pytest.raises(ValueError, match="needs trainable parameters, got none with requires_grad=True"):
        module.configure_optimizers()


def test_warmup_decay_schedule_values() -> None:
    linear = WarmupDecay(warmup=2, total=10, schedule="linear")
    assert [linear(s) for s in (0, 1, 2, 6, 10, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    cosine = WarmupDecay(warmup=0, total=10, schedule="cosine", min_ratio=0.1)
    assert [round(cosine(s), 6) for s in (0, 5, 10)] == [1.0, 0.55, 0.1]
    assert WarmupDecay(warmup=3, total=None)(50) == 1.0  # no max_steps: constant after warm-up
    assert WarmupDecay(warmup=0, total=10, schedule="constant")(9) == 1.0


def test_scheduler_follows_max_steps(micro_model_dir: str) -> None:
    module = CausalLMModule(micro_model_dir, lr=1e-2, warmup_steps=2)
    trainer = _trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(module, _task(micro_model_dir))
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends at 0 at max_steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0, got -1"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
        ({"torch_dtype": "fp8"}, r"torch_dtype must be None or one of .* got 'fp8'"),
        ({"schedule": "step"}, r"schedule must be 'linear', 'cosine' or 'constant', got 'step'"),
        ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\], got 2.0"),
        ({"model": ""}, r"model must be a zoo name, local folder or Hub name, got ''"),
    ],
)
def test_bad_module_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**kwargs)


def test_unloadable_model_folder_names_the_fix(tmp_path: Path) -> None:
    module = CausalLMModule(str(tmp_path))  # an existing folder with no model in it
    with pytest.raises(ValueError, match="model must name a loadable causal LM.*local save_pretrained folder"):
        module.configure_model()


def test_exact_match_metric() -> None:
    metric = ExactMatch()
    metric.update(["9", " The  cat sat. "], ["9", "The cat sat."])
    metric.update(["10", ""], ["11", "x"])
    assert float(metric.compute()) == 0.5
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(ExactMatch().compute()) == 0.0
    with pytest.raises(ValueError, match="one prediction per reference, got 1 predictions and 2"):
        metric.update(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="compares strings"):
        metric.update([1], ["1"])  # type: ignore[list-item]
