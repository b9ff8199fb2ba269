"""The names other fine-tuning tools give peftc's settings, so that an unknown key written the
way peft, axolotl, the Hugging Face Trainer (TRL) or LitGPT spell it is answered with peftc's
key (`peft.lora_r=8` -> peft.r), not with the nearest spelling (lora_r is closer to lora_bias)."""

from __future__ import annotations

# name in the other tool -> peftc's key (or override, where the setting is a group option)
OTHER_TOOLS_NAMES = {
    "rank": "peft.r",
    "lora_r": "peft.r",
    "lora_rank": "peft.r",
    "lora_target_modules": "peft.target_modules",
    "lora_target_linear": "peft.target_modules=all-linear",
    "learning_rate": "trainer.lr",
    "num_train_epochs": "trainer.max_epochs",
    "num_epochs": "trainer.max_epochs",
    "epochs": "trainer.max_epochs",
    "per_device_train_batch_size": "data.batch_size",
    "micro_batch_size": "data.batch_size",
    "train_batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "lr_scheduler_type": "trainer.scheduler",
    "lr_scheduler": "trainer.scheduler",
    "max_grad_norm": "trainer.gradient_clip_val",
    "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "load_in_4bit": "quant=bnb_nf4",
    "load_in_8bit": "quant=bnb_int8",
    "bf16": "trainer.precision=bf16-mixed",
    "fp16": "trainer.precision=16-mixed",
}
