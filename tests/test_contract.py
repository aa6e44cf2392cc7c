"""The contract every adapter method keeps: each method joins with ONE row of ``METHODS``.

A row gives the registry name, constructor kwargs, and the number of trainable parameters
the method adds to one ``nn.Linear(in, out)`` (an independent expectation, from the paper's
formula). Every test below runs for every row, through Lightning's own ``Trainer``,
``ModelCheckpoint`` and peft's own loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    EagerLM,
    LazyLM,
    WrappedPlainLM,
    base_params,
    peft_round_trip,
    save_random_llama,
    token_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from peft import PeftModel

import lightning_peft as lp
from lightning_peft import zoo
from lightning_peft.callback import adapter_names
from lightning_peft.checkpointing import adapter_key_prefixes


@dataclass(frozen=True)
class Row:
    name: str
    kwargs: dict
    params_per_linear: Callable[[int, int], int]  # (in_features, out_features) -> trainable count
    conv1d: bool = True  # False: the method adapts nn.Linear only, and GPT-2's Conv1D must fail with a clear error


METHODS = [
    Row("lora", {"r": 4, "alpha": 8}, lambda i, o: 4 * (i + o)),  # A: r x in, B: out x r
    # SHiRA: exactly round(density * in * out) trained entries per layer (peft's shira has no Conv1D layer)
    Row("shira", {"density": 0.02, "mask": "grad", "calibration_batches": 2}, lambda i, o: max(1, round(0.02 * i * o)),
        conv1d=False),
    # LoRA r=2 plus exactly round(density * in * out) sparse values; the mask is built after step 1
    Row("rosa", {"r": 2, "density": 0.01, "warmup_steps": 1, "mask_steps": 1}, lambda i, o: 2 * (i + o) + round(0.01 * i * o)),
]
ROWS = [pytest.param(r, id=r.name) for r in METHODS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_random_llama(tmp_path_factory.mktemp("base") / "llama", hidden=32)


def _module(kind: str, base_dir: str) -> L.LightningModule:
    if kind == "gpt2":
        return EagerLM(zoo.resolve("gpt2-micro-v1"))
    return {"eager": lambda: EagerLM(base_dir), "configure_model": lambda: LazyLM(base_dir), "plain": WrappedPlainLM}[kind]()


def _trainer(tmp_path: Path, callbacks, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, logger=kw.pop("logger", False), **kw,
    )


def _expected_trainable(module, row: Row) -> int:
    linear = [m for n, m in module.named_modules() if n.endswith(".base_layer")]
    return sum(row.params_per_linear(m.in_features, m.out_features) for m in linear)


# what "all-linear" must select in each kind of module: every linear layer except the output head
ALL_LINEAR = {
    "eager": {f"model.model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "plain": {"net.blocks.0", "net.blocks.2"},
}
ALL_LINEAR["configure_model"] = ALL_LINEAR["eager"]


def row_targets(module) -> list[str]:
    return [n.removesuffix(".base_layer") for n, _ in module.named_modules() if n.endswith(".base_layer")]


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("kind", ["eager", "configure_model", "plain"])
def test_only_adapter_parameters_train(row: Row, kind: str, base_dir: str, tmp_path: Path) -> None:
    module = _module(kind, base_dir)
    if kind == "configure_model":
        module.configure_model()  # snapshot the base before fit; the callback must still inject after it
    before = base_params(module)
    trainer = _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs)], max_steps=3)
    trainer.fit(module, token_loader())

    skip = adapter_key_prefixes(module)  # helpers.base_params only knows LoRA's tensor names
    after = {k: v for k, v in base_params(module).items() if not k.startswith(skip)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(row.name in n for n in trainable), sorted(trainable)[:3]
    assert sum(p.numel() for p in trainable.values()) == _expected_trainable(module, row)
    assert ModelSummary(module).trainable_parameters == _expected_trainable(module, row)
    assert set(row_targets(module)) == ALL_LINEAR[kind]


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory) -> str:
    """Wide enough that a checkpoint's fixed overhead (loops, callbacks: ~50 kB) does not dominate."""
    return save_random_llama(tmp_path_factory.mktemp("wide") / "llama", hidden=128)


@pytest.mark.parametrize("row", ROWS)
def test_checkpoint_is_adapter_only_and_resume_is_exact(row: Row, wide_base_dir: str, tmp_path: Path) -> None:
    base_dir = wide_base_dir
    def run(name: str, max_steps: int, ckpt_path: str | None = None) -> tuple[EagerLM, list[float]]:
        torch.manual_seed(0)
        module = EagerLM(base_dir)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)
        logger = CSVLogger(tmp_path, name=name, version=0)
        trainer = _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs), ckpt], max_steps, logger=logger,
                           log_every_n_steps=1)
        trainer.fit(module, token_loader(n=48), ckpt_path=ckpt_path)
        logger.finalize("success")
        rows = (tmp_path / name / "version_0" / "metrics.csv").read_text().splitlines()[1:]
        return module, [float(r.split(",")[-1]) for r in rows if r.split(",")[-1]]

    full, full_losses = run("full", max_steps=9)  # crosses an epoch boundary (6 batches per epoch)
    _, first_losses = run("first", max_steps=4)
    ckpt = tmp_path / "first" / "epoch=0-step=4.ckpt"
    resumed, resumed_losses = run("resumed", max_steps=9, ckpt_path=str(ckpt))

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state_dict"] and all(row.name in k for k in state["state_dict"]), "checkpoint holds base weights"
    assert state["optimizer_states"] and any(k.startswith("LoRA") or row.name in k.lower() for k in state["callbacks"])
    full_size = sum(p.numel() * p.element_size() for p in EagerLM(base_dir).parameters())
    assert ckpt.stat().st_size < 0.25 * full_size, (ckpt.stat().st_size, full_size)

    assert first_losses == full_losses[:4]
    assert resumed_losses == full_losses[4:], "resumed run logged other losses"
    adapters = lambda m: {k: v for k, v in m.state_dict().items()}  # noqa: E731  (adapter-only by contract)
    assert adapters(full).keys() == adapters(resumed).keys()
    assert all(torch.equal(adapters(full)[k], adapters(resumed)[k]) for k in adapters(full))


def test_resuming_with_another_rank_says_so(base_dir: str, tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    _trainer(tmp_path, [lp.LoRA(r=4), ckpt], max_steps=2).fit(EagerLM(base_dir), token_loader())
    with pytest.raises(ValueError, match=r"other shapes than this run's .*checkpoint \(4, 32\) vs this run \(8, 32\).*another rank"):
        _trainer(tmp_path, [lp.LoRA(r=8)], max_steps=4).fit(EagerLM(base_dir), token_loader(), ckpt_path=ckpt.last_model_path or ckpt.best_model_path)


@pytest.mark.parametrize("row", ROWS)
def test_weights_only_checkpoint_is_adapter_only(row: Row, base_dir: str, tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_train_steps=2)
    _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs), ckpt], max_steps=2).fit(EagerLM(base_dir), token_loader())
    state = torch.load(next(tmp_path.glob("*.ckpt")), map_location="cpu", weights_only=True)
    assert state["state_dict"] and all(row.name in k for k in state["state_dict"])
    assert "optimizer_states" not in state


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("kind", ["eager", "gpt2"])
def test_peft_round_trip(row: Row, kind: str, base_dir: str, tmp_path: Path) -> None:
    module = _module(kind, base_dir)
    base_dir = module.model.name_or_path
    if kind == "gpt2" and not row.conv1d:
        with pytest.raises(ValueError, match=r"nn\.Linear.*Conv1D"):
            lp.create_method(row.name, **row.kwargs).inject(module)
        return
    _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs)], max_steps=3).fit(module, token_loader())
    folder = lp.save_adapter(module, tmp_path / "adapter")
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    ours, untouched, theirs = peft_round_trip(module, base_dir, folder, ids)
    with torch.no_grad():
        reloaded = lp.load_adapter(_module(kind, base_dir).eval(), folder).model(input_ids=ids).logits
    assert not torch.allclose(ours, untouched), "training did not change the adapted output"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(reloaded, ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row", ROWS)
def test_plain_module_round_trip(row: Row, tmp_path: Path) -> None:
    module = WrappedPlainLM(seed=0)
    _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs)], max_steps=3).fit(module, token_loader())
    folder = lp.save_adapter(module, tmp_path / "adapter")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(WrappedPlainLM(seed=0).net, folder)(ids)
        reloaded = lp.load_adapter(WrappedPlainLM(seed=0), folder).net(ids)
        torch.testing.assert_close(reloaded, module.net(ids), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs, module.net(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("row", ROWS)
def test_stacks_with_a_second_adapter(row: Row, base_dir: str, tmp_path: Path) -> None:
    first = lp.create_method(row.name, **row.kwargs)
    second = lp.LoRA(r=2, target_modules=["q_proj"], adapter_name="extra")
    module = LazyLM(base_dir)
    _trainer(tmp_path, [first, second], max_steps=2).fit(module, token_loader())
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    holds = lambda a: any(f".{a}." in n or n.endswith(f".{a}") for n in names)  # noqa: E731  (ModuleDict or ParameterDict)
    assert holds("default") and holds("extra")
    # both adapters contribute: a q_proj output is base + each adapter's own delta
    layer = module.model.model.layers[0].self_attn.q_proj
    chain = _tuner_chain(layer)  # one tuner layer per method: another method's layer wraps the first
    assert sorted(a for t in chain for a in t.active_adapters) == ["default", "extra"]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in chain:
            for n, p in t.named_parameters():
                if not n.startswith("base_layer."):
                    p.normal_()  # make every delta nonzero
        base = chain[-1].get_base_layer()
        delta = sum(t.get_delta_weight(a) for t in chain for a in t.active_adapters)  # peft's dense (out, in) deltas
        expected = torch.nn.functional.linear(x, base.weight + delta, base.bias)
        # fp32 rounding grows with the output's size (the deltas of random-normal factors are large)
        torch.testing.assert_close(layer(x), expected, rtol=1.3e-6, atol=1e-6 * float(expected.abs().max()) + 1e-5)
    v_proj = module.model.model.layers[0].self_attn.v_proj  # holds only `default`: still active
    assert v_proj.active_adapters == ["default"] or "default" in v_proj.active_adapters


@pytest.mark.parametrize("second", ["same class", "another method"])
def test_two_callbacks_with_one_adapter_name_fail_clearly(second: str, base_dir: str, tmp_path: Path) -> None:
    first = lp.RoSA(r=2, density=0.05)
    other = lp.RoSA(r=2, density=0.05) if second == "same class" else lp.LoRA(r=2)
    module = EagerLM(base_dir)
    trainer = _trainer(tmp_path, [first, other], max_steps=1)  # Lightning's own duplicate-key check passes
    with pytest.raises(ValueError, match=r"use adapter_name='default'; each stacked adapter needs its own name.*"
                                         r"adapter_name='default_2'"):
        trainer.fit(module, token_loader())
    assert not adapter_names(module) and all(p.requires_grad for p in module.parameters())  # nothing injected
    # with distinct names the keys are the stable ones that resume looks up
    ok = [lp.RoSA(r=2, density=0.05), lp.LoRA(r=2, adapter_name="b")]
    _trainer(tmp_path / "ok", list(ok), max_steps=1).fit(LazyLM(base_dir), token_loader())
    assert [cb.state_key for cb in ok] == ["RoSA[default]", "LoRA[b]"]


def _tuner_chain(layer) -> list:
    """The peft tuner layers wrapped into each other at one module, outermost first."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    chain = [layer]
    while isinstance(getattr(chain[-1], "base_layer", None), BaseTunerLayer):
        chain.append(chain[-1].base_layer)
    return chain


@pytest.mark.parametrize("row", ROWS)
def test_two_all_linear_adapters_stack(row: Row, base_dir: str) -> None:
    module = EagerLM(base_dir)
    lp.create_method(row.name, **row.kwargs).inject(module)
    lp.LoRA(r=2, adapter_name="second").inject(module)
    chain = _tuner_chain(module.model.model.layers[1].mlp.down_proj)
    assert sorted(a for t in chain for a in t.active_adapters) == ["default", "second"]


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_every_precision_trains_close_to_fp32(row: Row, precision: str, base_dir: str, tmp_path: Path) -> None:
    """Lightning's precision plugins (CPU autocast for ``bf16-mixed``): same losses as ``32-true`` within bf16's
    resolution, and the adapter's values stay in the dtype the plugin keeps them in."""
    def losses(precision: str) -> list[float]:
        torch.manual_seed(0)
        recorder = _LossRecorder()
        trainer = _trainer(tmp_path, [lp.create_method(row.name, **row.kwargs), recorder], 4, precision=precision)
        trainer.fit(EagerLM(base_dir), token_loader(n=32))
        return recorder.losses

    reference, got = losses("32-true"), losses(precision)
    assert len(got) == len(reference) == 4
    assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(got, reference, strict=True)), (got, reference)
