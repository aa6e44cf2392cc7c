"""The runs that ``test_strategies.py`` compares: one model, one data set, several methods.

Imported by the tests for the single-process side; run as a script (``python strategy_cases.py
ddp|fsdp OUT CKPT``) it is the 2-process side: Lightning's subprocess launcher re-runs this file
for rank 1, every rank runs the same fits in the same order on one gloo process group, and each
rank saves what it trained to ``OUT/<run>_rank<r>.pt`` (FSDP: rank 0's checkpoints, since the
module itself holds only shards).

Equal-data construction: ``N_ROWS = 8`` unshuffled rows. One process with batch ``2 b = 4``
sees rows ``[4 i, 4 i + 4)`` at step ``i``; two ranks with batch ``b = 2`` under
:class:`StridedSampler` see rows ``4 i + {0, 2}`` (rank 0) and ``4 i + {1, 3}`` (rank 1).
(Lightning's own ``DistributedSampler`` always shuffles training data, hence
``use_distributed_sampler=False`` and :meth:`TinyLM.train_dataloader`.) The loss is a mean over equal-size per-rank batches and DDP averages the gradients, so
both runs take the same optimizer steps up to float rounding. An epoch is 2 steps either way; the
loader is a ``StatefulDataLoader`` whose sampler counts *global* rows, so a run resumed from the
step-2 checkpoint (written before Lightning closes the epoch) goes on with the next batch, under
either process count, instead of replaying the epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Sampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import lightning_peft as lp

VOCAB, WIDTH, FFN, SEQ = 37, 16, 24, 8  # small primes and not powers of two where it matters
N_ROWS, STEPS = 8, 4


class GatedMLP(nn.Module):
    """Llama's FFN shape (``down(silu(gate(x)) * up(x))``), so Trans-PEFT finds it by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(WIDTH, FFN), nn.Linear(WIDTH, FFN)
        self.down_proj = nn.Linear(FFN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyDecoder(nn.Module):
    """One residual block: ``h + tanh(q(h))``, ``h + mlp(h)``, then a vocabulary head.

    ``aux`` is never called: ``target_modules="all-linear"`` adapts it, so its adapter is unused in
    every step (the case ``static_graph`` exists for).
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.q_proj = nn.Linear(WIDTH, WIDTH)
        self.mlp = GatedMLP()
        self.aux = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, C)
        h = h + torch.tanh(self.q_proj(h))
        h = h + self.mlp(h)
        return self.head(h)  # (B, T, V)


class TinyLM(L.LightningModule):
    """Next-token loss over a :class:`TinyDecoder` built in ``__init__``; AdamW over what trains."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        self.seed, self.lr = seed, lr
        self.net = self.build()

    def build(self) -> TinyDecoder:
        with torch.random.fork_rng():  # leaves the global RNG alone: the adapter init after it is the same
            torch.manual_seed(self.seed)  # whether the model is built in __init__ or in configure_model
            return TinyDecoder()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self.net(ids[:, :-1])  # (B, T-1, V)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> StatefulDataLoader:
        """4 rows per step in all: ``4 / world_size`` per rank, rank ``k`` of ``n`` reading rows ``k, k + n, ...``."""
        ids = torch.randint(0, VOCAB, (N_ROWS, SEQ), generator=torch.Generator().manual_seed(7))
        world = self.trainer.world_size
        sampler = StridedSampler(N_ROWS, self.trainer.global_rank, world)
        return StatefulDataLoader(TensorDataset(ids), batch_size=4 // world, sampler=sampler)


class LazyTinyLM(TinyLM):
    """The same model built in ``configure_model`` (idempotent), as large-model code does."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        L.LightningModule.__init__(self)
        self.seed, self.lr, self.net = seed, lr, None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self.build()


class StridedSampler(Sampler[int]):
    """Rows ``rank, rank + world, ...`` in order; its state counts global rows, so it resumes under any world size."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.rows = list(range(rank, n, world))
        self.world, self.epoch, self.done = world, 0, 0  # done: global rows consumed this epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for row in self.rows[self.done // self.world :]:
            self.done += self.world
            yield row
        self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.done = int(state["epoch"]), int(state["done"])


class SeedAtSetup(L.Callback):
    """Seeds torch before the adapter callbacks inject (LoRA's ``A`` is random): same init in every run."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.manual_seed(1)


def methods(run: str) -> list[L.Callback]:
    """The adapter callbacks of a run (a fresh set each time); ``-<variant>`` suffixes share them."""
    # RoSA ranks gradients it collected: `aux` (never called) would have none, so it is left out
    rosa = {"r": 2, "density": 0.1, "warmup_steps": 1, "mask_steps": 1, "mask_criterion": "mean", "exclude_modules": ["aux"]}
    return {
        "lora": lambda: [lp.LoRA(r=2)],
        # "mean" criterion: |mean of dO^T X| over the micro-batches, which all-reduced over 2 ranks equals
        # the one-process statistic of the 2b batch (fisher, the mean of squares, would not)
        "rosa": lambda: [lp.RoSA(**rosa)],
        "rosa_bf16": lambda: [lp.RoSA(**rosa)],
        "rosa_plain_ddp": lambda: [lp.RoSA(**rosa)],
        "shira": lambda: [lp.SHiRA(density=0.1, mask="wm")],
        "shira_grad": lambda: [lp.SHiRA(density=0.1, mask="grad", calibration_batches=1)],
        "transpeft_off": lambda: [lp.LoRA(r=2), lp.TransPEFT(mask_p=0.0, drop_p=0.0)],
        "transpeft": lambda: [lp.LoRA(r=2), lp.TransPEFT(mask_p=0.3, drop_p=0.5, seed=3)],
        # all four at once, each method on its own layer (one spawn launch covers them all)
        "stack": lambda: [
            lp.LoRA(r=2, target_modules=["q_proj"], adapter_name="lora"),
            lp.RoSA(**{**rosa, "target_modules": ["mlp.up_proj"]}, adapter_name="rosa"),
            lp.SHiRA(density=0.1, mask="wm", target_modules=["mlp.down_proj"], adapter_name="shira"),
            lp.TransPEFT(mask_p=0.0, drop_p=0.0),
        ],
    }[run.split("-")[0]]()


class RecordDtypes(L.Callback):
    """Records the dtype of every parameter once training starts (after precision and wrapping)."""

    def __init__(self) -> None:
        self.dtypes: dict[str, torch.dtype] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dtypes = {n: p.dtype for n, p in pl_module.named_parameters()}


def fit(run: str, strategy: Any = "auto", devices: int = 1, max_steps: int = STEPS, lazy: bool = False,
        ckpt_dir: Path | None = None, ckpt_path: str | None = None, precision: str = "32-true",
        extra: list[L.Callback] | None = None) -> tuple[L.LightningModule, L.Trainer]:
    """Train ``run`` for ``max_steps``; ``devices`` ranks share the global batch of 4 rows."""
    module = (LazyTinyLM if lazy else TinyLM)()
    callbacks = [SeedAtSetup(), *methods(run), *(extra or [])]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1, every_n_epochs=1))
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=devices, strategy=strategy, callbacks=callbacks,
        accumulate_grad_batches=2 if run.endswith("-accumulate") else 1,  # 2 x 4 rows per optimizer step
        precision=precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None, default_root_dir=str(ckpt_dir or "."),
        use_distributed_sampler=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict (adapter-only once an adapter is injected) as CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class RecordFSDPUnits(L.Callback):
    """After the first backward: per FSDP unit, its flat parameter's dtype, size and gradient (``None`` = no memory)."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from lightning_peft.checkpointing import clean_name

        if self.units:
            return
        for name, unit in trainer.model.named_modules():
            if isinstance(unit, FSDP):
                flat = unit._flat_param  # torch's FlatParameter of this unit (the local shard)
                self.units[clean_name(name + ".").rstrip(".") or "<root>"] = {
                    "dtype": flat.dtype, "numel": flat.numel(), "requires_grad": flat.requires_grad,
                    "grad": None if flat.grad is None else (flat.grad.numel(), flat.grad.dtype),
                }


def main_fsdp(out: Path, single_ckpt: str) -> None:
    """The 2-process ``adapter_fsdp`` runs on CPU: LoRA fp32 and bf16-true, checkpoints both ways."""
    record, dtypes = RecordFSDPUnits(), RecordDtypes()
    _, trainer = fit("lora", "adapter_fsdp", devices=2, ckpt_dir=out / "fsdp_ckpt", extra=[record])
    torch.save({"units": record.units}, out / f"fsdp_lora_rank{trainer.global_rank}.pt")
    record = RecordFSDPUnits()
    _, trainer = fit("lora", "adapter_fsdp", devices=2, precision="bf16-true", extra=[record, dtypes])
    torch.save({"units": record.units, "dtypes": dtypes.dtypes}, out / f"fsdp_lora_bf16_rank{trainer.global_rank}.pt")
    fit("lora", "adapter_fsdp", devices=2, ckpt_dir=out / "fsdp_resumed", ckpt_path=single_ckpt)
    if trainer.global_rank == 0:
        (out / "DONE").write_text("ok")


def main(out: Path, single_ckpt: str) -> None:
    """The 2-process runs (``adapter_ddp`` unless named otherwise); see the module docstring."""
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_peft.callback import AdapterStrategyError

    def save(name: str, module: nn.Module, trainer: L.Trainer, **extra: Any) -> None:
        torch.save({"state": state(module), **extra}, out / f"{name}_rank{trainer.global_rank}.pt")

    for run in ("lora", "rosa", "shira", "shira_grad", "transpeft_off", "transpeft", "lora-accumulate"):
        module, trainer = fit(run, "adapter_ddp", devices=2, max_steps=1 if run == "shira_grad" else STEPS)
        save(run, module, trainer)
    record = RecordDtypes()
    module, trainer = fit("rosa_bf16", "adapter_ddp", devices=2, precision="bf16-true", extra=[record])
    save("rosa_bf16", module, trainer, dtypes=record.dtypes)
    # stock DDP without find_unused_parameters: works because RoSA's inactive S adds an exact zero term
    module, trainer = fit("rosa_plain_ddp", DDPStrategy(find_unused_parameters=False), devices=2)
    save("rosa_plain_ddp", module, trainer)
    # resume across process counts: DDP -> one process (the test resumes), one process -> DDP (here)
    fit("rosa", "adapter_ddp", devices=2, max_steps=2, ckpt_dir=out / "ddp_ckpt")
    module, trainer = fit("rosa", "adapter_ddp", devices=2, ckpt_path=single_ckpt)
    save("rosa_resumed_from_single", module, trainer)
    # stock DDP with an adapter that never gets a gradient (`aux`): a named error after the first backward,
    # on every rank alike, so the group is still usable afterwards
    try:
        fit("lora", DDPStrategy(find_unused_parameters=False), devices=2)
    except AdapterStrategyError as err:
        (out / f"stock_ddp_unused_rank{trainer.global_rank}.txt").write_text(str(err))
    if trainer.global_rank == 0:
        (out / "DONE").write_text("ok")


if __name__ == "__main__":
    {"ddp": main, "fsdp": main_fsdp}[sys.argv[1]](Path(sys.argv[2]), sys.argv[3])
