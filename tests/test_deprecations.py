"""Old public names (CHANGELOG.md, "Deprecated") still work for one release, each with a DeprecationWarning
that names the new one."""

from __future__ import annotations

import importlib
import sys

import pytest

import lightning_peft as lp
from lightning_peft.adapter_folder import AdapterRecord
from lightning_peft.analysis import evolve_stats
from lightning_peft.ffn_sites import find_ffn_sites
from lightning_peft.resume import SettingsChangedError
from lightning_peft.transfer import StudentConfig, student


@pytest.mark.parametrize(("module", "old", "new", "hint"), [
    ("lightning_peft", "RosaConfig", lp.RosaPeftConfig, "RosaPeftConfig"),
    ("lightning_peft.methods.rosa", "RosaConfig", lp.RosaPeftConfig, "RosaPeftConfig"),
    ("lightning_peft.methods.rosa.config", "RosaConfig", lp.RosaPeftConfig, "RosaPeftConfig"),
    ("lightning_peft.upgrade", "UpgradeSettingsError", SettingsChangedError, "SettingsChangedError"),
    ("lightning_peft.transfer.pipeline", "warm_start_from", student.warm_start_from, "student.warm_start_from"),
    ("lightning_peft.transfer.pipeline", "synthetic_examples", student.synthetic_examples, "student.synthetic_examples"),
    ("lightning_peft.transfer.pipeline", "train_student", student.train_student, "transfer.train_student"),
])
def test_renamed_names_still_resolve_with_a_warning(module: str, old: str, new: object, hint: str) -> None:
    with pytest.warns(DeprecationWarning, match=hint):
        assert getattr(importlib.import_module(module), old) is new
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        importlib.import_module(module).NoSuchName  # noqa: B018  (the attribute access is the test)


@pytest.mark.parametrize(("module", "name", "new"), [
    ("lightning_peft.methods.trans_peft", "TransPEFT", lp.TransPEFT),
    ("lightning_peft.methods.trans_peft.ffn", "find_ffn_sites", find_ffn_sites),
    ("lightning_peft.evolve", "recovery_ratio", evolve_stats.recovery_ratio),
])
def test_moved_modules_still_import_with_a_warning(module: str, name: str, new: object) -> None:
    for loaded in [m for m in sys.modules if m == module or m.startswith("lightning_peft.methods.trans_peft")]:
        del sys.modules[loaded]  # imported before by another test: import it afresh to see the warning
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        assert getattr(importlib.import_module(module), name) is new


def test_the_former_record_and_student_calls_still_work(tmp_path) -> None:
    with pytest.warns(DeprecationWarning, match="AdapterFolder"):
        assert lp.upgrade.read_record(tmp_path) == AdapterRecord()
    with pytest.warns(DeprecationWarning, match="record=AdapterRecord"):
        assert lp.upgrade.set_record(None, task="sql", seeds=["Q?"]) == AdapterRecord(task="sql", seeds=["Q?"])
    with pytest.warns(DeprecationWarning, match="StudentConfig"):  # the former positional order, and by name
        assert student._legacy_student("lora", ({"r": 8}, {"lr": 1.0}, {"max_steps": 2}, {}, False), {}, True) == (
            StudentConfig("lora", {"r": 8}, {"lr": 1.0}, {"max_steps": 2}, {}), False)
    with pytest.warns(DeprecationWarning, match="StudentConfig"):
        assert student._legacy_student(None, (), {"method": "shira", "test": False}, True) == (StudentConfig("shira"), False)
