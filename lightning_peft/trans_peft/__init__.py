"""Trans-PEFT (Gu et al., "Adapt Once, Thrive with Updates", ACL 2025, arXiv 2506.06844).

Continual pre-training of a base model (v_o -> v_n) mostly rewrites FFN weights (knowledge)
and leaves attention (task patterns) nearly intact. Trans-PEFT trains the adapter on v_o so
that it depends less on the exact FFN knowledge, with two training-only interventions
(section 3)::

    decoder layer l:  a = x + Attn(LN1(x))
                      h = act(LN2(a) W_gate) * (LN2(a) W_up)        # (B, T, d_ff)
      masking:        h = h * m,  m ~ Bernoulli(1 - p_m) per element   (no 1/(1-p) rescaling)
      dropping:       x' = a + FFN(LN2(a))   with prob. 1 - p_d,   x' = a   with prob. p_d

It is a training regulariser, not an adapter method: a plain callback that stacks with any adapter
callback (LoRA, RoSA, SHiRA). It adds no parameters and hooks the FFNs (:mod:`lightning_peft.ffn_sites`)
in ``on_fit_start``, after adapters are injected (in ``setup`` or ``configure_model``) and the model is
wrapped; eval/inference are untouched.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_peft.callback import AdapterStrategyError
from lightning_peft.config import check_resumed_config
from lightning_peft.ffn_sites import FFNSite, NoFFNFoundError, find_ffn_sites
from lightning_peft.trans_peft.config import TransPEFTConfig
from lightning_peft.trans_peft.hooks import KeyedRandom, SiteHooks

__all__ = ["FFNSite", "NoFFNFoundError", "TransPEFT", "TransPEFTConfig", "find_ffn_sites"]

log = logging.getLogger(__name__)


class TransPEFT(L.Callback):
    """Intra-layer knowledge masking and cross-layer knowledge dropping of FFNs while training.

    ``Trainer(callbacks=[LoRA(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), TransPEFT()])``:
    the defaults are the paper's released configuration (adapter on q, k, v, o; p_d = 0.1, p_m = 0).

    Randomness: one ``batch_seed`` is drawn per training micro-batch from a ``torch.Generator``
    (seeded with ``seed``; its state is in the callback's ``state_dict``, so resuming is
    exact); masks and drop decisions are keyed on ``(batch_seed, rank, layer)``, so an
    activation-checkpoint recompute draws the same ones. A dropped FFN adds
    ``0 * sum(trainable params)`` so DDP sees its adapters used (gradient 0), with
    ``find_unused_parameters=False``.

    Args:
        mask_p: Masking probability p_m of each FFN intermediate element, in [0, 1).
        drop_p: Probability p_d of skipping a layer's whole FFN per micro-batch, in [0, 1].
        ffn_modules: ``"auto"``, a regex, or a list of FFN module names/suffixes.
        seed: Seed of the generator.

    Raises:
        ValueError: An argument is out of range.
        NoFFNFoundError: (at fit start) no FFN found; the message names candidates.
    """

    config_cls = TransPEFTConfig

    def __init__(
        self, mask_p: float = 0.0, drop_p: float = 0.1, ffn_modules: str | list[str] = "auto", seed: int = 0
    ) -> None:
        self.config = TransPEFTConfig(mask_p=mask_p, drop_p=drop_p, ffn_modules=ffn_modules, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = KeyedRandom(self.config.mask_p, self.config.drop_p)
        self.rng.batch_seed = seed
        self.micro_batches = 0
        self.sites: list[FFNSite] = []
        self._hooks: list[SiteHooks] = []

    # ------------------------------------------------------------------ plain-torch API
    def attach(self, module: nn.Module, rank: int = 0) -> list[FFNSite]:
        """Hook the FFNs of ``module`` (idempotent); returns the sites found.

        Raises:
            NoFFNFoundError: no FFN matched ``ffn_modules``.
        """
        self.detach()
        self.sites = find_ffn_sites(module, self.config.ffn_modules)
        self.rng.rank = rank
        masking, dropping = self.config.mask_p > 0, self.config.drop_p > 0
        no_projection = [s.name for s in self.sites if s.project is None]
        if masking and no_projection:
            raise NoFFNFoundError(
                f"TransPEFT masking (mask_p={self.config.mask_p}) needs an output projection inside each FFN, "
                f"found none in {no_projection[:3]}; name modules that contain a linear layer, or set mask_p=0"
            )
        for index, site in enumerate(self.sites):
            hooks = SiteHooks(site, index, self.rng)
            hooks.attach(mask=masking, drop=dropping)
            self._hooks.append(hooks)
        log.info(
            "TransPEFT: %d FFN sites (%s), mask_p=%s drop_p=%s",
            len(self.sites), self.sites[0].kind, self.config.mask_p, self.config.drop_p,
        )
        return self.sites

    def detach(self) -> None:
        """Remove every hook (the model is then exactly as before :meth:`attach`)."""
        for hooks in self._hooks:
            hooks.detach()
        self._hooks = []

    def next_micro_batch(self) -> int:
        """Draw the ``batch_seed`` of the next micro-batch from the generator; returns it."""
        self.rng.batch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self.micro_batches += 1
        return self.rng.batch_seed

    def dropped_layers(self) -> list[int]:
        """Indices of the FFN sites skipped in the current micro-batch."""
        return [i for i in range(len(self.sites)) if self.rng.dropped(i)]

    # ------------------------------------------------------------------ Lightning hooks
    def check_strategy_name(self, strategy: str) -> None:
        """Refuse a strategy this callback cannot run under (``adapter_fsdp`` asks every callback that has this hook).

        Raises:
            AdapterStrategyError: ``adapter_fsdp`` with ``drop_p > 0``.
        """
        if strategy == "adapter_fsdp" and self.config.drop_p > 0:
            raise AdapterStrategyError(
                f"adapter_fsdp: TransPEFT(drop_p={self.config.drop_p}) skips different FFNs on each rank, but FSDP needs "
                "every rank to run the same units (their all-gathers must pair up). Use Trainer(strategy='adapter_ddp') "
                "for Trans-PEFT dropping, or drop_p=0 (masking works under FSDP)."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.attach(pl_module, rank=trainer.global_rank)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.next_micro_batch()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.detach()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    def __getstate__(self) -> dict[str, Any]:
        # torch.multiprocessing (adapter_ddp_spawn) pickles tensors as shared memory that lives only as
        # long as the tensor; a Generator's state is a temporary tensor, so a spawned worker fails to read
        # it ("unable to resize file"). Plain bytes travel.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "generator": generator})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "generator": self.generator.get_state(),
            "batch_seed": self.rng.batch_seed,
            "micro_batches": self.micro_batches,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_config("TransPEFT", state_dict.get("config", {}), dataclasses.asdict(self.config))
        self.generator.set_state(state_dict["generator"])
        self.rng.batch_seed = int(state_dict["batch_seed"])
        self.micro_batches = int(state_dict["micro_batches"])
