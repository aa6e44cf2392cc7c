"""RoSA under 2-process DDP on CPU (gloo, ``adapter_ddp_spawn``): identical masks on every rank.

Each rank sees other data (Lightning's DistributedSampler), so the rank-local statistics differ;
the all-reduced statistic must equal the statistic of one process over the union of the
micro-batches, recomputed here with plain autograd.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from test_rosa import TARGETS, TinyNet, tiny_batches
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_peft.methods._sparse import topk_mask
from lightning_peft.methods.rosa import RoSA


class ShardedTinyNet(TinyNet):
    """Rank ``k`` of 2 gets samples ``k, k + 2, ...`` in order (an explicit, unshuffled sampler)."""

    def train_dataloader(self) -> DataLoader:
        x = torch.cat([b[0] for b in tiny_batches(32, 2)])
        y = torch.cat([b[1] for b in tiny_batches(32, 2)])
        ds = TensorDataset(x, y)
        sampler = DistributedSampler(ds, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=2, sampler=sampler)


class RecordingRoSA(RoSA):
    """Writes each rank's local and all-reduced statistics and the masks it built to ``out``."""

    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def _build_masks(self, trainer: L.Trainer | None) -> None:
        reduce = self._all_reduce(trainer)
        record = {
            "local": {n: c.statistic() for n, c in self._collectors.items()},
            "reduced": {n: c.statistic(reduce) for n, c in self._collectors.items()},
        }
        super()._build_masks(trainer)
        record["masks"] = {n: m.index("default").flat() for n, m in self.layers().items()}
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_build_identical_masks_from_the_union_of_their_data(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ShardedTinyNet()
    cb = RecordingRoSA(str(tmp_path), r=0, density=0.2, target_modules=TARGETS, mask_steps=2)
    L.Trainer(
        max_steps=3, callbacks=[cb], accelerator="cpu", devices=2, strategy="adapter_ddp_spawn", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        use_distributed_sampler=False,
    ).fit(module)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert set(r0["masks"]) == {"net.0", "net.2"}
    for name in r0["masks"]:
        assert not torch.allclose(r0["local"][name], r1["local"][name]), "ranks saw the same data"
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        torch.testing.assert_close(r0["reduced"][name], r1["reduced"][name], rtol=0, atol=0)

    # one process over the union: rank k saw the samples k, k + 2, ...;
    # 2 steps x 2 ranks = 4 micro-batches of 2 samples; r=0 keeps the model unchanged until the mask
    net = TinyNet().net
    x = torch.cat([b[0] for b in tiny_batches(32, 2)])
    y = torch.cat([b[1] for b in tiny_batches(32, 2)])
    sums = {"net.0": torch.zeros(6, 7), "net.2": torch.zeros(5, 6)}
    for rank in (0, 1):
        idx = torch.arange(rank, 32, 2)
        for step in range(2):
            b = idx[2 * step : 2 * step + 2]
            g0, g2 = torch.autograd.grad(F.mse_loss(net(x[b]), y[b]), [net[0].weight, net[2].weight])
            sums["net.0"] += g0**2
            sums["net.2"] += g2**2
    for name, total in sums.items():
        torch.testing.assert_close(r0["reduced"][name], total / 4, rtol=1e-5, atol=1e-9)
        assert torch.equal(r0["masks"][name], topk_mask(total / 4, 0.2).flat())
