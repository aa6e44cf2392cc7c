"""Deprecated (kept for one release): the protocol's statistics moved to :mod:`lightning_peft.analysis.evolve_stats`,
the ``lightning-peft evolve`` command to :mod:`lightning_peft.cli.evolve`."""

import warnings

from lightning_peft.analysis.evolve_stats import *  # noqa: F403  (the old names)

warnings.warn("lightning_peft.evolve is deprecated: its statistics are lightning_peft.analysis.evolve_stats, the "
              "command is lightning_peft.cli.evolve", DeprecationWarning, stacklevel=2)
