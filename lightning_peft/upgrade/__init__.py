"""Upgrade a fleet of adapters to a new base release (``lightning-peft upgrade``).

* :mod:`.record`: what an adapter carries for it (task, seed inputs, discriminator): :class:`UpgradeRecord`;
* :mod:`.config`: what to upgrade to what, and how (:class:`UpgradeConfig`);
* :mod:`.agreement`: the data-free check of a candidate against the old base + old adapter (greedy outputs, KL);
* :mod:`.fidelity`: the share of the old adapter's effect a candidate keeps, 0 at the bare new base and 1 at the
  old base + old adapter, scale-free and across tokenizers (reported for every candidate; ``score=fidelity`` decides
  on it);
* :mod:`.routes`: the routes (direct reuse, Trans-LoRA) as a protocol, in one registry: :data:`ROUTES`;
* :mod:`.student_check`: a Trans-LoRA student scored while it trains, stopped when it cannot pass: :class:`StudentCheck`;
* :mod:`.fleet`: trying the routes per adapter, "needs data", resume, shards: :func:`upgrade_fleet`;
* :mod:`.report`: ``upgrade_report.{json,csv,md,png}`` and the W&B table, merged across shards.
"""

from lightning_peft._deprecated import deprecated_names
from lightning_peft.resume import SettingsChangedError
from lightning_peft.upgrade.agreement import Agreement, agreement, completion_kl, text_similarity
from lightning_peft.upgrade.config import UpgradeConfig
from lightning_peft.upgrade.fidelity import Fidelity, fidelity
from lightning_peft.upgrade.fleet import find_adapters, upgrade_adapter, upgrade_fleet
from lightning_peft.upgrade.record import AdapterRecord, UpgradeRecord, read_record, set_record
from lightning_peft.upgrade.routes import ROUTES, Candidate, Route, RouteContext, RouteSkipped, register_route
from lightning_peft.upgrade.student_check import StudentCheck

__all__ = [
    "ROUTES",
    "AdapterRecord",
    "Agreement",
    "Candidate",
    "Fidelity",
    "Route",
    "RouteContext",
    "RouteSkipped",
    "StudentCheck",
    "UpgradeConfig",
    "UpgradeRecord",
    "agreement",
    "completion_kl",
    "fidelity",
    "find_adapters",
    "read_record",
    "register_route",
    "set_record",
    "text_similarity",
    "upgrade_adapter",
    "upgrade_fleet",
]

__getattr__ = deprecated_names(__name__, {"UpgradeSettingsError": (SettingsChangedError,
                                                                   "lightning_peft.resume.SettingsChangedError")})
