"""Add LoRA to an existing LightningModule, train, and save the adapter in peft's format.

Run: python examples/add_lora.py   (builds the micro zoo model locally on first use, ~10 s)
"""

import lightning as L
import torch
from transformers import AutoModelForCausalLM

import lightning_peft as lp
from lightning_peft import zoo
from lightning_peft.tasks import Data2TextTask


class MyModule(L.LightningModule):  # your own module: nothing lightning_peft-specific in it
    def __init__(self, path: str) -> None:
        super().__init__()
        self.net = AutoModelForCausalLM.from_pretrained(path)

    def training_step(self, batch, batch_idx):
        loss = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # runs after injection: only adapter parameters require grad
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


if __name__ == "__main__":
    path = zoo.resolve("llama-micro-v1")  # or any Hugging Face checkpoint name / folder
    module = MyModule(path)
    trainer = L.Trainer(max_steps=30, callbacks=[lp.LoRA(r=8, target_modules="all-linear")], logger=False)
    trainer.fit(module, datamodule=Data2TextTask(tokenizer=path, num_train=256, num_val=0, num_test=0))
    print("saved", lp.save_adapter(module, "lora-adapter"))  # loads with peft.PeftModel.from_pretrained
