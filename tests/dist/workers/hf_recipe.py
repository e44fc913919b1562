"""The Hugging Face Trainer recipe of docs/deepspeed.md, which docs/integrations.md reuses
under FSDP: CAdamW built in a ``create_optimizer`` override (the Trainer drops
``optimizers=(...)`` under DeepSpeed and refuses it under FSDP) and, under DeepSpeed,
attached in a callback once the engine exists. One copy for ds_hf_trainer.py and
integrations_worker.py. Needs ``transformers``.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from dist_cautious import CAdamW


class CAdamWTrainer(Trainer):
    """Builds CAdamW in create_optimizer: the Trainer's decay / no-decay split by name,
    ``weight_decay``, lr, betas and eps from the TrainingArguments. Under FSDP2 the Trainer
    calls it on the unsharded model, under FSDP1 on the wrapped one."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            m = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(m))
            params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            self.optimizer = CAdamW(
                [
                    {
                        "params": [p for n, p in params if n in decay],
                        "weight_decay": self.args.weight_decay,
                    },
                    {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
                ],
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer


class AttachCAdamW(TrainerCallback):
    """Registers the ZeRO layouts once DeepSpeed has wrapped the optimizer."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from dist_cautious import deepspeed as dc_ds

        dc_ds.attach(optimizer)
