"""Trans-PEFT: masking statistics, exact FFN skipping, eval untouched, resume, recompute, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import EagerLM, LazyLM, WrappedPlainLM, save_random_llama, token_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import lightning_peft as lp
from lightning_peft.ffn_sites import NoFFNFoundError, find_ffn_sites


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_random_llama(tmp_path_factory.mktemp("tp") / "llama", hidden=32, layers=2)


def _llama(path: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(path).train()


def _ids(b: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(seed))


class _Calls:
    """Counts forward calls of named modules."""

    def __init__(self, model: nn.Module, suffixes: tuple[str, ...]) -> None:
        self.counts: dict[str, int] = {}
        for name, m in model.named_modules():
            if name.endswith(suffixes) and ".base_layer" not in name:
                self.counts[name] = 0
                # a pre-hook: checkpoint recompute stops early (inside the last op), before post-hooks
                m.register_forward_pre_hook(lambda mod, a, n=name: self.counts.__setitem__(n, self.counts[n] + 1))


def test_masking_zeroes_about_p_of_the_intermediate_and_does_not_rescale(llama_dir: str) -> None:
    model = _llama(llama_dir)
    raw, masked = {}, {}
    for i, layer in enumerate(model.model.layers):  # recorder registered before the callback's hook ...
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: raw.__setitem__(i, a[0].detach().clone()))
    tp = lp.TransPEFT(mask_p=0.3, drop_p=0.0, seed=1)
    tp.attach(model)
    for i, layer in enumerate(model.model.layers):  # ... and one after it
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: masked.__setitem__(i, a[0].detach().clone()))
    tp.next_micro_batch()
    model(input_ids=_ids())
    for i in raw:
        h, hm = raw[i], masked[i]  # (B, T, d_ff)
        assert h.shape == (4, 32, 64) and (h != 0).all()
        zeroed = hm == 0
        assert abs(zeroed.float().mean().item() - 0.3) < 0.02  # 8192 elements: sd 0.005
        torch.testing.assert_close(hm[~zeroed], h[~zeroed], rtol=0, atol=0)  # kept values unscaled
    # a new micro-batch draws a new mask; the same micro-batch redraws the same one
    first = masked[0] == 0
    model(input_ids=_ids())
    assert torch.equal(masked[0] == 0, first)
    tp.next_micro_batch()
    model(input_ids=_ids())
    assert not torch.equal(masked[0] == 0, first)


def test_dropping_skips_exactly_the_ffn_and_keeps_attention_and_residual(llama_dir: str) -> None:
    model = _llama(llama_dir)
    expected = copy.deepcopy(model)
    for layer in expected.model.layers:  # independent expectation: an FFN whose output is zero
        for p in layer.mlp.down_proj.parameters():
            p.data.zero_()
    calls = _Calls(model, ("gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"))
    lp.TransPEFT(mask_p=0.0, drop_p=1.0).attach(model)
    out = model(input_ids=_ids()).logits
    torch.testing.assert_close(out, expected(input_ids=_ids()).logits, rtol=0, atol=0)
    assert all(n == 0 for k, n in calls.counts.items() if "mlp" in k), calls.counts  # computation skipped
    assert all(n == 1 for k, n in calls.counts.items() if "self_attn" in k), calls.counts


def test_one_drop_decision_per_layer_per_micro_batch(llama_dir: str) -> None:
    model = _llama(llama_dir)
    calls = _Calls(model, ("mlp.gate_proj",))
    tp = lp.TransPEFT(mask_p=0.0, drop_p=0.4, seed=3)
    tp.attach(model)
    dropped = []
    for _ in range(150):
        tp.next_micro_batch()
        before = dict(calls.counts)
        model(input_ids=_ids(2, 4))
        ran = [calls.counts[k] - before[k] for k in sorted(calls.counts)]
        assert [i for i, r in enumerate(ran) if r == 0] == tp.dropped_layers()
        dropped.append(len(tp.dropped_layers()))
    assert abs(sum(dropped) / (2 * 150) - 0.4) < 0.07  # 300 decisions: sd 0.028


def test_eval_mode_is_untouched_and_detach_restores(llama_dir: str) -> None:
    model, reference = _llama(llama_dir), _llama(llama_dir)
    tp = lp.TransPEFT(mask_p=0.5, drop_p=0.5)
    tp.attach(model)
    tp.next_micro_batch()
    with torch.no_grad():
        model.eval(), reference.eval()
        torch.testing.assert_close(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits, rtol=0, atol=0)
        model.train(), reference.train()
        assert not torch.allclose(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits)
        tp.detach()
        torch.testing.assert_close(model(input_ids=_ids()).logits, reference(input_ids=_ids()).logits, rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_gpt2_and_opt_ffns_are_found_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[nn.Module] = []  # every nn.Linear whose own computation runs
    linear_forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: (ran.append(self), linear_forward(self, x))[1])
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=64)).train()
    sites = find_ffn_sites(gpt2)
    assert [(s.name, s.kind) for s in sites] == [(f"transformer.h.{i}.mlp", "gpt2") for i in range(2)]
    assert all(s.project is gpt2.transformer.h[i].mlp.c_proj for i, s in enumerate(sites))

    for pre_norm in (True, False):
        torch.manual_seed(0)
        cfg = OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                        word_embed_proj_dim=32, max_position_embeddings=64, do_layer_norm_before=pre_norm, dropout=0.0)
        opt = OPTForCausalLM(cfg).train()
        expected = copy.deepcopy(opt)
        for layer in expected.model.decoder.layers:
            layer.fc2.weight.data.zero_(), layer.fc2.bias.data.zero_()
        sites = find_ffn_sites(opt)
        assert [s.kind for s in sites] == ["opt", "opt"]
        lp.TransPEFT(mask_p=0.0, drop_p=1.0).attach(opt)
        ran.clear()
        torch.testing.assert_close(opt(input_ids=_ids()).logits, expected(input_ids=_ids()).logits, rtol=0, atol=0)
        ffn = {id(m) for layer in opt.model.decoder.layers for m in (layer.fc1, layer.fc2)}
        assert ran and not ffn & {id(m) for m in ran}  # attention projections ran, fc1/fc2 did not


def test_explicit_module_names_and_a_clear_error() -> None:
    module = WrappedPlainLM()
    with pytest.raises(NoFFNFoundError, match=r"no FFN sub-block in WrappedPlainLM.*ffn_modules=\[\.\.\.\]"):
        lp.TransPEFT().attach(module)
    sites = lp.TransPEFT(ffn_modules=["blocks"]).attach(module)
    assert [s.name for s in sites] == ["net.blocks"] and sites[0].project is module.net.blocks[2]
    with pytest.raises(NoFFNFoundError, match="ffn_modules='nothing'"):
        lp.TransPEFT(ffn_modules="nothing").attach(module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mask_p": 1.0}, r"mask_p .* \[0, 1\), got mask_p=1.0"), ({"drop_p": -0.1}, r"drop_p .* got drop_p=-0.1"),
     ({"seed": -1}, "seed"), ({"ffn_modules": []}, "ffn_modules")],
)
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lp.TransPEFT(**kwargs)


def test_recompute_under_activation_checkpointing_draws_the_same_masks(llama_dir: str) -> None:
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        model = _llama(llama_dir)
        lp.LoRA(r=4).inject(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = _Calls(model, ("down_proj",))
        tp = lp.TransPEFT(mask_p=0.5, drop_p=0.3, seed=7)
        tp.attach(model)
        for _ in range(3):  # a micro-batch where some but not all layers are dropped is not needed:
            tp.next_micro_batch()  # masks alone differ between draws
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls.counts

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    ran = [k for k, n in plain_calls.items() if n]
    assert ran and all(ckpt_calls[k] == 2 * plain_calls[k] for k in ran), (plain_calls, ckpt_calls)  # recomputed
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def _fit(tmp_path: Path, name: str, path: str, max_steps: int, ckpt_path: str | None = None, lazy: bool = False):
    torch.manual_seed(0)
    module = (LazyLM if lazy else EagerLM)(path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_top_k=-1)
    logger = CSVLogger(tmp_path, name=name, version=0)
    tp = lp.TransPEFT(mask_p=0.2, drop_p=0.3, seed=5)
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[lp.LoRA(r=4), tp, ckpt], accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, logger=logger, log_every_n_steps=1, default_root_dir=tmp_path,
    )
    trainer.fit(module, token_loader(n=48), ckpt_path=ckpt_path)
    logger.finalize("success")
    rows = (tmp_path / name / "version_0" / "metrics.csv").read_text().splitlines()[1:]
    return module, tp, [float(r.split(",")[-1]) for r in rows if r.split(",")[-1]]


def test_stacks_with_lora_on_a_lazy_model_and_resumes_exactly(llama_dir: str, tmp_path: Path) -> None:
    full, tp, losses = _fit(tmp_path, "full", llama_dir, 7, lazy=True)
    assert tp.micro_batches == 7 and len(tp.sites) == 2
    assert all(isinstance(s.project, BaseTunerLayer) for s in tp.sites)  # hooked after LoRA was injected
    assert all("forward" not in m.__dict__ for m in full.modules())  # detached after fit
    _, _, plain_losses = _fit_without_transpeft(tmp_path, llama_dir)
    assert losses != plain_losses  # the callback changed training

    _fit(tmp_path, "first", llama_dir, 3, lazy=True)
    resumed, tp2, resumed_losses = _fit(tmp_path, "resumed", llama_dir, 7, str(tmp_path / "first" / "epoch=0-step=3.ckpt"), lazy=True)
    assert resumed_losses == losses[3:]
    assert tp2.rng.batch_seed == tp.rng.batch_seed and tp2.micro_batches == 7
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def _fit_without_transpeft(tmp_path: Path, path: str):
    torch.manual_seed(0)
    module = LazyLM(path)
    logger = CSVLogger(tmp_path, name="plain", version=0)
    trainer = L.Trainer(max_steps=7, callbacks=[lp.LoRA(r=4)], accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, logger=logger, log_every_n_steps=1, default_root_dir=tmp_path,
                        enable_checkpointing=False)
    trainer.fit(module, token_loader(n=48))
    logger.finalize("success")
    rows = (tmp_path / "plain" / "version_0" / "metrics.csv").read_text().splitlines()[1:]
    return module, None, [float(r.split(",")[-1]) for r in rows if r.split(",")[-1]]


_DDP_SCRIPT = """
import sys
import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from helpers import EagerLM, token_loader
import lightning_peft as lp

trainer = L.Trainer(
    max_steps=3, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=False),
    callbacks=[lp.LoRA(r=2), lp.TransPEFT(mask_p=0.0, drop_p=1.0)],
)
trainer.fit(EagerLM(sys.argv[1]), token_loader(n=32, batch_size=4))
print("FIT-DONE", trainer.global_step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("anchor", [True, False])
def test_ddp_without_find_unused_parameters(anchor: bool, llama_dir: str, tmp_path: Path) -> None:
    """2-process gloo DDP (Lightning's own launcher re-runs the script), every FFN dropped so its LoRA
    adapters are unused in every step, and find_unused_parameters=False."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    if not anchor:  # control: without the zero-weighted term DDP must fail, or this test proves nothing
        env["LIGHTNING_PEFT_TRANS_PEFT_NO_ANCHOR"] = "1"
    proc = subprocess.run([sys.executable, str(script), llama_dir], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    if anchor:
        assert proc.returncode == 0 and "FIT-DONE 3" in proc.stdout, proc.stderr[-3000:]
    else:
        # lightning-peft's first-step check (callback.check_unused_under_ddp) names the tensors that got no
        # gradient before DDP fails with "Expected to have finished reduction" in the next step
        assert proc.returncode != 0 and "got no gradient in the first step" in proc.stderr, proc.stderr[-3000:]
        assert "12 trainable tensors" in proc.stderr and "layers.0.mlp.gate_proj.lora_A.default.weight" in proc.stderr
