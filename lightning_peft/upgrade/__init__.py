"""Upgrade a fleet of adapters to a new base release (``lightning-peft upgrade``).

* :mod:`.record`: what an adapter carries for it (task, seed inputs, discriminator): :class:`UpgradeRecord`;
* :mod:`.agreement`: the data-free check of a candidate against the old base + old adapter;
* :mod:`.fleet`: the routes (direct reuse, Trans-LoRA, needs data), resume, shards: :func:`upgrade_fleet`;
* :mod:`.report`: ``upgrade_report.{json,csv,md,png}`` and the W&B table, merged across shards.
"""

from lightning_peft.upgrade.agreement import Agreement, agreement, completion_kl, text_similarity
from lightning_peft.upgrade.fleet import (
    ROUTES,
    UpgradeConfig,
    UpgradeSettingsError,
    find_adapters,
    upgrade_adapter,
    upgrade_fleet,
)
from lightning_peft.upgrade.record import AdapterRecord, UpgradeRecord, read_record, set_record

__all__ = [
    "ROUTES",
    "AdapterRecord",
    "Agreement",
    "UpgradeConfig",
    "UpgradeRecord",
    "UpgradeSettingsError",
    "agreement",
    "completion_kl",
    "find_adapters",
    "read_record",
    "set_record",
    "text_similarity",
    "upgrade_adapter",
    "upgrade_fleet",
]
