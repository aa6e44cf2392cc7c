"""`CausalLMModule`: the reference LightningModule for users who have none.

It wraps any Hugging Face causal LM (a zoo name, a local folder or a Hub name) and trains
it on the batches of `lightning_peft.tasks` (``input_ids``, ``attention_mask``, ``labels``).
Validation and test log the loss, perplexity, next-token accuracy and, from greedy
generations, exact match of the task's extracted answers.

The model is built in `configure_model`, which adapter callbacks wrap to inject their
adapters right after it; `configure_optimizers` then sees only trainable (adapter)
parameters.

Example:
    >>> import lightning as L
    >>> from lightning_peft.module import CausalLMModule
    >>> from lightning_peft.tasks import get_task
    >>> module = CausalLMModule("llama-v1", lr=1e-3)  # doctest: +SKIP
    >>> L.Trainer(max_steps=100).fit(module, get_task("arithmetic", tokenizer="llama-v1"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity
from transformers import AutoTokenizer, GenerationConfig

from lightning_peft.metrics import ExactMatch, RougeL, normalize_whitespace
from lightning_peft.tasks.data import IGNORE_INDEX

Schedule = Literal["linear", "cosine", "constant"]
_DTYPES = ("float32", "float16", "bfloat16", "auto")


class WarmupDecay:
    """LR multiplier: linear warm-up over ``warmup`` steps, then decay to ``min_ratio``.

    Args:
        warmup: Warm-up steps (the multiplier grows linearly from ``1 / warmup`` to 1).
        total: Total steps (``None``: no decay after warm-up).
        schedule: ``"linear"``, ``"cosine"`` or ``"constant"`` decay after warm-up.
        min_ratio: Multiplier reached at ``total``.
    """

    def __init__(self, warmup: int, total: int | None, schedule: Schedule = "linear", min_ratio: float = 0.0) -> None:
        self.warmup, self.total, self.schedule, self.min_ratio = warmup, total, schedule, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None or self.schedule == "constant" or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        shape = 1.0 - progress if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


class CausalLMModule(L.LightningModule):
    """Fine-tunes a Hugging Face causal LM on prompt/completion batches.

    Args:
        model: Zoo name (e.g. ``"llama-v1"``, built on first use), local folder or Hub name.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrices (vectors such as biases and norms get
            none).
        warmup_steps: Linear warm-up steps.
        max_new_tokens: Most tokens generated per answer for exact match.
        generate_on_val: Generate during validation (exact match); test always generates.
        torch_dtype: ``None``/``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``:
            dtype the weights are loaded in.
        schedule: Decay after warm-up when ``trainer.max_steps`` is set: ``"linear"`` or
            ``"cosine"`` to ``min_lr_ratio * lr``, or ``"constant"``.
        min_lr_ratio: Final LR as a fraction of ``lr``.
        betas: AdamW betas.
        tokenizer: Tokenizer name/path (default: the model's).
        model_kwargs: Extra ``AutoModelForCausalLM.from_pretrained`` arguments.

    Raises:
        ValueError: An argument is out of range (the message names the fix).
    """

    def __init__(
        self,
        model: str = "llama-v1",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 32,
        generate_on_val: bool = True,
        torch_dtype: str | None = None,
        schedule: Schedule = "linear",
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        tokenizer: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a zoo name, local folder or Hub name, got {model!r}; e.g. 'llama-v1'")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}; typical values are 1e-4 to 3e-3")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}; use 0.0 to disable it")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}; use 0 for no warm-up")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}; e.g. 32")
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be None or one of {_DTYPES}, got {torch_dtype!r}")
        if schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}; 0 decays to zero")
        self.save_hyperparameters()
        self.model: nn.Module | None = None  # built in configure_model
        self.tokenizer: Any = None
        self.metrics: nn.ModuleDict | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Load the tokenizer, the model and the metrics (idempotent: built once)."""
        if self.model is not None:
            return
        from lightning_peft import zoo  # lazy: the zoo pulls in its build machinery

        hp = self.hparams
        path = zoo.resolve(hp.model)
        kwargs = dict(hp.model_kwargs or {})
        if hp.torch_dtype is not None and "torch_dtype" not in kwargs:  # None: zoo.load_model's float32
            kwargs.setdefault("dtype", hp.torch_dtype if hp.torch_dtype == "auto" else getattr(torch, hp.torch_dtype))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(hp.tokenizer) if hp.tokenizer else path)
            model = zoo.load_model(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"model must name a loadable causal LM, got {hp.model!r} (resolved to {path!r}); use a zoo name "
                f"({', '.join(zoo.names()[:3])}, ...) or a local save_pretrained folder (nothing is downloaded when "
                f"the Hub is unreachable). Loading failed with: {type(err).__name__}: {err}"
            ) from err
        model.train()
        vocab = model.get_output_embeddings().weight.shape[0]
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {
                        "ppl": Perplexity(ignore_index=IGNORE_INDEX),
                        "token_acc": MulticlassAccuracy(num_classes=vocab, ignore_index=IGNORE_INDEX, average="micro"),
                        "exact_match": ExactMatch(),
                        "rougeL": RougeL(),
                    }
                )
                for stage in ("val", "test")
            }
        )
        self.model = model

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "CausalLMModule.model is built in configure_model(); run it through a Trainer or call "
                "module.configure_model() first"
            )
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """The HF model's output (``.loss`` when ``labels`` are given, ``.logits`` (B, T, V))."""
        return self._require_model()(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def on_fit_start(self) -> None:
        """Reset the metrics; warn when examples are longer than the model's context."""
        # A standalone `trainer.validate` resets metric states inside inference mode, which
        # makes them inference tensors that fit's (no-grad, not inference-mode) validation
        # cannot update in place: recreate them here, outside inference mode.
        if self.metrics is not None:
            with torch.inference_mode(False):
                for metric in self.metrics.modules():
                    if isinstance(metric, Metric):
                        metric.reset()
        dm = getattr(self.trainer, "datamodule", None)
        longest = getattr(dm, "longest_example", None)
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if longest and context is not None and longest > context:
            rank_zero_warn(
                f"the datamodule's longest example has {longest} tokens, more than the model's "
                f"max_position_embeddings={context}; set the task's max_length <= {context} (prompts are then cut "
                "from the left): learned position embeddings fail past it, RoPE models extrapolate poorly"
            )

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """LM loss on the completion tokens; logs ``train/loss``."""
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss, perplexity, token accuracy and (if ``generate_on_val``) exact match."""
        self._eval_step(batch, "val", generate=self.hparams.generate_on_val)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss, perplexity, token accuracy and exact match."""
        self._eval_step(batch, "test", generate=True)

    def _eval_step(self, batch: dict[str, Any], stage: str, generate: bool) -> None:
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"])  # raises if not built
        metrics, n = self.metrics[stage], len(batch["input_ids"])  # built with the model
        logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        target = batch["labels"][:, 1:]  # (B, T-1)
        metrics["ppl"].update(logits, target)
        metrics["token_acc"].update(logits.argmax(-1).reshape(-1), target.reshape(-1))  # (B*(T-1),)
        self.log(f"{stage}/loss", out.loss, batch_size=n, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/ppl", metrics["ppl"], batch_size=n)
        self.log(f"{stage}/token_acc", metrics["token_acc"], batch_size=n)
        if generate and "prompt_input_ids" in batch and "answers" in batch:
            texts = self.generate_completions(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            dm = self._datamodule()
            extract = getattr(dm, "extract_answer", None) or normalize_whitespace
            metrics["exact_match"].update([extract(t) for t in texts], list(batch["answers"]))
            self.log(f"{stage}/exact_match", metrics["exact_match"], batch_size=n, prog_bar=stage == "val")
            if "rougeL" in getattr(dm, "generation_metrics", ()):
                metrics["rougeL"].update([normalize_whitespace(t) for t in texts], list(batch["answers"]))
                self.log(f"{stage}/rougeL", metrics["rougeL"], batch_size=n)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    @torch.no_grad()
    def generate_completions(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[str]:
        """Greedy completions of left-padded prompts, decoded without special tokens.

        Args:
            prompt_input_ids: (B, P) left-padded prompt ids.
            prompt_attention_mask: (B, P) 1 on prompt tokens, 0 on padding.

        Returns:
            The ``B`` generated texts (prompt excluded).
        """
        model = self._require_model()
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = GenerationConfig(
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        out = model.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, generation_config=config
        )  # (B, P + new)
        return tok.batch_decode(out[:, prompt_input_ids.shape[1] :], skip_special_tokens=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over trainable parameters; warm-up then decay over ``trainer.max_steps``.

        Raises:
            ValueError: No parameter requires grad.
        """
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "configure_optimizers needs trainable parameters, got none with requires_grad=True; attach an "
                "adapter callback or leave the model unfrozen"
            )
        hp = self.hparams
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, hp.weight_decay), (no_decay, 0.0))
            if params
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        # Only max_steps: `trainer.estimated_stepping_batches` would set up the train loader
        # before the checkpoint is restored and lose its saved position (Lightning #20550).
        trainer = self._trainer
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(hp.warmup_steps, max_steps, hp.schedule, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
