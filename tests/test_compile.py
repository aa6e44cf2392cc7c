"""Sparse methods train under ``torch.compile`` (CPU inductor here, CUDA when available), compiled in the
user's ``configure_model`` as Lightning's docs suggest: the same losses as eager within tolerance and no graph
break in the sparse layers (their in-place merge is a ``torch.library`` custom op, opaque to inductor)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import EagerLM, save_random_llama, token_loader
from torch._dynamo.utils import counters

import lightning_peft as lp


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class CompiledLM(EagerLM):
    def configure_model(self) -> None:  # Lightning's recipe: compile the model in configure_model
        if not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_random_llama(tmp_path_factory.mktemp("compile") / "llama", hidden=32)


METHODS = {
    "shira": lambda: lp.SHiRA(density=0.05, mask="random"),
    "rosa-random": lambda: lp.RoSA(r=2, density=0.05, warmup_steps=1, mask_steps=1, mask_criterion="random"),
    "rosa-fisher": lambda: lp.RoSA(r=2, density=0.05, warmup_steps=1, mask_steps=1),
}


def _fit(cls: type, method: str, path: str) -> tuple[list[float], dict[str, int]]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    record = _Losses()
    L.Trainer(max_steps=4, callbacks=[METHODS[method](), record], accelerator="cpu", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
        cls(path), token_loader(n=32))
    return record.losses, dict(counters["graph_break"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparse_methods_train_compiled_like_eager(method: str, llama: str) -> None:
    eager, _ = _fit(EagerLM, method, llama)
    compiled, breaks = _fit(CompiledLM, method, llama)
    assert len(compiled) == len(eager) == 4
    assert all(abs(a - b) < 2e-3 * abs(b) for a, b in zip(compiled, eager, strict=True)), (compiled, eager)
    if method == "rosa-fisher":  # only the one gradient-collection step's tensor hook breaks the graph
        assert all("GradientCollector" in reason for reason in breaks), list(breaks)
    else:
        assert not breaks, list(breaks)


def test_adapter_bank_switches_a_compiled_model_without_recompiling(llama: str) -> None:
    """activate / fuse / deactivate write into the weights in place: the compiled graph reads them as inputs, so
    switching SHiRA and RoSA adapters triggers no recompilation and no graph break, and gives eager's outputs."""
    from transformers import AutoModelForCausalLM

    sources = {}
    for name, method in (("s1", lp.SHiRA(density=0.05, mask="random", seed=1)),
                         ("s2", lp.SHiRA(density=0.05, mask="random", seed=2)),
                         ("r", lp.RoSA(r=2, density=0.05, warmup_steps=0, mask_criterion="random"))):
        torch.manual_seed(len(sources))
        module = EagerLM(llama)
        L.Trainer(max_steps=2, callbacks=[method], accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, token_loader(n=16))
        sources[name] = module
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    bank = lp.AdapterBank(base)
    for name, module in sources.items():
        bank.add(name, module)
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    plan = [None, "s1", "s2", {"s1": 1.0, "r": 0.5}, "r", None]
    with torch.no_grad():
        expected = []
        for step in plan:
            bank.fuse({step: 1.0} if isinstance(step, str) else step) if step else bank.deactivate()
            expected.append(base(input_ids=ids).logits.clone())
        bank.deactivate()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(base)
        got = []
        for step in plan:
            bank.fuse({step: 1.0} if isinstance(step, str) else step) if step else bank.deactivate()
            got.append(compiled(input_ids=ids).logits.clone())
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    assert not counters["recompiles"]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], got[0]) and not torch.allclose(got[2], got[1])
