"""Skip work finished with the same settings; refuse work finished with other settings, naming the keys.

The commands that write many results into one folder (``lightning-peft upgrade``: one folder per
adapter; ``lightning-peft evolve``: one folder per seed) leave a small JSON file beside each
finished piece, holding the settings that determined it. A rerun into the same folder then

* reuses a piece whose recorded settings are the current ones (same digest);
* **refuses** a piece finished with other settings, before any work starts: the error names every
  differing key (``trainer.max_steps: before 3 vs now 5``) and the fix; mixing results of two
  settings in one report would be silently wrong;
* redoes it instead when the command's explicit override is given (``redo_changed=true``,
  ``evolve.redo_changed=true``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_peft.atomic import atomic_write_text

__all__ = ["FinishedFile", "SettingsChangedError", "changed_settings", "settings_digest"]


class SettingsChangedError(ValueError):
    """Work was finished into the same folder with other settings (the message names the keys and the fix)."""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """First 16 hex digits of the sha256 of ``settings`` as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: before X vs now Y"`` for every (dotted) key whose value differs, sorted."""
    old, new = _flat(before), _flat(now)
    return [f"{k}: before {old.get(k)!r} vs now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


@dataclass(frozen=True)
class FinishedFile:
    """The JSON file that marks one piece of work finished, with the settings it was made with.

    Args:
        path: The file.
        override: The command's override that redoes changed work (named in the error).
        elsewhere: Where else the work could go (named in the error), e.g. ``"out= folder"``.
        digest_key: The key the settings digest is stored under.
    """

    path: Path
    override: str
    elsewhere: str
    digest_key: str = "digest"

    def read(self, settings: Mapping[str, Any], redo_changed: bool = False) -> dict[str, Any] | None:
        """What the file holds when it was written with ``settings``; ``None`` when there is no such file, or it was
        written with other settings and ``redo_changed``.

        Raises:
            SettingsChangedError: written with other settings (and not ``redo_changed``).
        """
        if not self.path.is_file():
            return None
        saved = json.loads(self.path.read_text())
        if saved.get(self.digest_key) == settings_digest(settings):
            return saved
        if redo_changed:
            return None
        before = saved.get("settings")
        what = "; ".join(changed_settings(before, settings)) if before is not None else "the file records no settings"
        raise SettingsChangedError(
            f"{self.path.parent} was finished with other settings ({what}). Write into another {self.elsewhere}, "
            f"pass {self.override} to redo it with the current settings, or delete {self.path}."
        )

    def write(self, settings: Mapping[str, Any], content: Mapping[str, Any]) -> None:
        """Atomically record ``content`` as finished with ``settings``."""
        atomic_write_text(self.path, json.dumps({**content, "settings": settings,
                                                 self.digest_key: settings_digest(settings)}, indent=2))
