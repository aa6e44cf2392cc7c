"""Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258): carry an adapter to a new base.

* :mod:`.synthesis`: the generator's seed-list prompt, parsing of its completions, de-duplication;
* :mod:`.models`: sampling candidates, the discriminator's yes/no margins, teacher labels;
* :mod:`.discriminator`: training the discriminator (function or ``TransLoRADiscriminator``
  callback after source training);
* :mod:`.filtering`: rejection sampling with acceptance statistics, MMD of embeddings;
* :mod:`.provenance`: synthetic sets cached as JSONL with what produced them;
* :mod:`.config`: what a transfer is asked to do (:class:`TransferConfig`, :class:`StudentConfig`);
* :mod:`.pipeline`: :func:`synthesize`: generate, filter, label;
* :mod:`.student`: :func:`train_student` on the target model;
* :mod:`.distill`: the optional token-level KL to the teacher (shared vocabulary only).
"""

from lightning_peft.tasks.examples import ExamplesDataModule
from lightning_peft.transfer.config import StudentConfig, TransferConfig, adapter_fingerprint
from lightning_peft.transfer.discriminator import (
    TransLoRADiscriminator,
    discriminator_accuracy,
    train_discriminator,
)
from lightning_peft.transfer.distill import DistillationModule, token_kl
from lightning_peft.transfer.filtering import FilterResult, mmd_rbf, rejection_sample
from lightning_peft.transfer.models import (
    DISCRIMINATOR_TEMPLATE,
    adapters_disabled,
    completion_margins,
    discriminator_examples,
    greedy_completions,
    sample_candidates,
)
from lightning_peft.transfer.pipeline import SynthesisShortError, fitting_seeds, synthesize
from lightning_peft.transfer.provenance import FORMAT_VERSION, ProvenanceMismatchError, SyntheticSet
from lightning_peft.transfer.student import train_student
from lightning_peft.transfer.synthesis import (
    Deduplicator,
    SeedFormat,
    normalize_for_dedup,
    parse_generation,
    seed_list_prompt,
)

__all__ = [
    "DISCRIMINATOR_TEMPLATE",
    "FORMAT_VERSION",
    "Deduplicator",
    "DistillationModule",
    "ExamplesDataModule",
    "FilterResult",
    "ProvenanceMismatchError",
    "SeedFormat",
    "StudentConfig",
    "SynthesisShortError",
    "SyntheticSet",
    "TransLoRADiscriminator",
    "TransferConfig",
    "adapter_fingerprint",
    "adapters_disabled",
    "completion_margins",
    "discriminator_accuracy",
    "discriminator_examples",
    "fitting_seeds",
    "greedy_completions",
    "mmd_rbf",
    "normalize_for_dedup",
    "parse_generation",
    "rejection_sample",
    "sample_candidates",
    "seed_list_prompt",
    "synthesize",
    "token_kl",
    "train_discriminator",
    "train_student",
]
