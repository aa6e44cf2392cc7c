"""Synthetic sets as JSONL with provenance: inspect, resume and repeat a transfer.

Line 1 is the header (what produced the set); every further line is one example::

    {"kind": "header", "format": 1, "task": ..., "generator": ..., "teacher": ...,
     "source_adapter_fingerprint": ..., "seeds": [...], "sampling": {...}, "discriminator": ...}
    {"kind": "example", "input": ..., "output": ..., "accepted": true, "score": 1.7}

Rejected inputs are kept too (``accepted: false``, no output) so the acceptance rate and the
MMD of kept vs rejected can be recomputed later. Files are replaced atomically (temporary
file in the same folder, then ``os.replace``): a crash mid-write leaves the previous file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.atomic import atomic_write_text

__all__ = ["FORMAT_VERSION", "ProvenanceMismatchError", "SyntheticSet"]

FORMAT_VERSION = 1


class ProvenanceMismatchError(ValueError):
    """A cached synthetic set was made with other settings than the ones asked for now."""


@dataclass
class SyntheticSet:
    """A header plus example records; see the module docstring for the file layout.

    Attributes:
        header: JSON-serialisable provenance (models, adapter fingerprint, seeds, sampling, ...).
        records: ``{"input", "output", "accepted", "score"}`` dicts in generation order.
    """

    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("accepted")]

    @property
    def acceptance_rate(self) -> float:
        return len(self.accepted) / len(self.records) if self.records else float("nan")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to ``path`` (parent folders created)."""
        lines = [json.dumps({"kind": "header", "format": FORMAT_VERSION, **self.header}, sort_keys=True)]
        lines += [json.dumps({"kind": "example", **r}, sort_keys=True) for r in self.records]
        return atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SyntheticSet:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a synthetic-set file (no header, unknown format, a broken line).
        """
        path = Path(path)
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            rows = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno if hasattr(e, 'lineno') else '?'} is not JSON ({e.msg}); "
                             "delete the file to regenerate the synthetic set.") from e
        if not rows or rows[0].get("kind") != "header":
            raise ValueError(f"{path} has no provenance header on line 1; it was not written by SyntheticSet.save.")
        header = dict(rows[0])
        header.pop("kind")
        version = header.pop("format", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: synthetic-set format {version!r}, this version reads {FORMAT_VERSION}; regenerate it.")
        records = []
        for i, r in enumerate(rows[1:], start=2):
            if r.pop("kind", None) != "example":
                raise ValueError(f"{path}: line {i} is not an example record; delete the file to regenerate.")
            records.append(r)
        return cls(header=header, records=records)

    def check_header(self, expected: dict[str, Any]) -> None:
        """Raise :class:`ProvenanceMismatchError` naming every key whose value differs from ``expected``."""
        diff = {k: (self.header.get(k), v) for k, v in expected.items() if self.header.get(k) != _jsonable(v)}
        if diff:
            pretty = "; ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ProvenanceMismatchError(
                f"the cached synthetic set was made with other settings ({pretty}). Use another cache file, "
                "or delete it to regenerate with the current settings."
            )


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True))
