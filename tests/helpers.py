"""Small user-style LightningModules and data used across tests (not a test file)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.utils.data import TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_peft.data import resumable_loader

VOCAB = 101  # prime: no power-of-two coincidences


def save_random_llama(path, hidden: int = 32, layers: int = 2, seed: int = 0, **overrides) -> str:
    """A randomly initialised Llama saved with ``save_pretrained`` (a real HF folder)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=overrides.pop("vocab_size", VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **overrides,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


class _LMBase(LightningModule):
    lr = 1e-2

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self(ids)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class EagerLM(_LMBase):
    """Builds its HF model in ``__init__``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.model.train()

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss


class LazyLM(EagerLM):
    """Builds its HF model in ``configure_model`` (idempotent), as large-model code does."""

    def __init__(self, path: str) -> None:
        LightningModule.__init__(self)
        self.path, self.model = path, None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(self.path)
            self.model.train()


class PlainNet(nn.Module):
    """A plain torch model: no transformers, no naming convention; ``head`` is its output layer."""

    def __init__(self, vocab: int = VOCAB, width: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


def plain_base(width: int = 24) -> PlainNet:
    """The base every bank test adapts: ``PlainNet(width)`` built under seed 0."""
    torch.manual_seed(0)
    return PlainNet(width=width)


def shira_net(seed: int, width: int = 24, **shira: Any) -> PlainNet:
    """:func:`plain_base` holding one SHiRA adapter (mask seed ``seed``, ``shira`` passed to ``lp.SHiRA``) whose
    values are random (generator seed ``100 + seed``), so adapters of different seeds differ everywhere."""
    import lightning_peft as lp

    net = plain_base(width)
    lp.SHiRA(seed=seed, **shira).inject(net)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for module in net.modules():
            if hasattr(module, "shira_weight"):
                w = module.shira_weight["default"]
                w.copy_(torch.randn(w.shape, generator=g))
    return net


class WrappedPlainLM(_LMBase):
    """A LightningModule around a plain ``nn.Module`` under an arbitrary attribute name."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = PlainNet()

    def forward(self, ids):
        logits = self.net(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def token_loader(n: int = 64, seq: int = 12, batch_size: int = 8, seed: int = 0):
    """Random token batches, shuffled and resumable at any step."""
    g = torch.Generator().manual_seed(seed)
    return resumable_loader(TensorDataset(torch.randint(0, VOCAB, (n, seq), generator=g)), batch_size, seed=seed)


def base_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Non-adapter parameters under names without peft's ``.base_layer`` (comparable before/after injection)."""
    return {
        n.replace(".base_layer.", "."): p.detach().clone()
        for n, p in module.named_parameters()
        if "lora_" not in n
    }


def read_wandb_offline_run(path, timeout: float = 60.0) -> list:
    """The W&B ``Record`` protobufs of an offline ``run-*.wandb`` file, once its ``exit`` record is on disk.

    W&B's core process can still be flushing its last 32 KiB block when ``wandb.finish()``
    returns (seen: a file cut at 32768 bytes), so this re-reads until the run's ``exit`` record
    is there or ``timeout`` seconds have passed (then it returns what it could read).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _decode_wandb_run(path)
        except Exception:  # a chunk cut mid-write  # noqa: BLE001
            records = []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _decode_wandb_run(path) -> list:
    """Decode an offline ``run-*.wandb`` file into W&B ``Record`` protobufs.

    W&B 0.31 writes it with its Go core and ships no Python reader: a 7-byte header (``:W&B``,
    key 0xBEE1, version 0) then LevelDB-log blocks of 32 KiB holding chunks (crc32c: 4 bytes,
    length: 2, type: 1 = full, 2 = first, 3 = middle, 4 = last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def peft_round_trip(module, base_path: str, folder, ids):
    """``(ours, untouched, theirs)`` logits on ``ids``: the trained module, the bare base, and peft's own loader
    (``PeftModel.from_pretrained``) of the saved adapter ``folder`` on a fresh copy of the base."""
    from peft import PeftModel

    module.eval()
    with torch.no_grad():
        ours = module.model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_path).eval()
        untouched = plain(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(plain, folder).eval()(input_ids=ids).logits
    return ours, untouched, theirs


def assert_matches_oracle_under_autocast(op, oracle, leaves: dict[str, torch.Tensor], grad_out: torch.Tensor,
                                         dtype: torch.dtype) -> None:
    """``op(**leaves)`` against ``oracle(**leaves)`` under CPU autocast ``dtype`` (``bf16-mixed`` / ``16-mixed``):
    outputs in ``dtype``, equal within its rounding, and gradients of the fp32 leaves back in fp32, equal too."""
    mine = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    ref = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    with torch.autocast("cpu", dtype=dtype):
        y, y_ref = op(**mine), oracle(**ref)
    assert y.dtype == y_ref.dtype == dtype
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    for name in leaves:
        assert mine[name].grad.dtype == torch.float32, name
        torch.testing.assert_close(mine[name].grad, ref[name].grad, atol=5e-2, rtol=2e-2, msg=name)
