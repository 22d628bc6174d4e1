"""The defaults the Python API and the `fastlora` command share, written once so they cannot drift.

LoRA's alpha has no constant here: None means alpha = rank (scaling 1, PEFT's ratio), the rule
fastlora.lora.config.LoraConfig applies, and train_lora, train_qlora and `fastlora train` pass
None through to it.
"""

WEIGHT_DECAY = 0.01  # torch.optim.AdamW's: fl.AdamW, train_full_finetune/train_lora/train_qlora, fastlora train
LR_FULL = 1e-3       # learning rate of train_full_finetune and `fastlora train` without --lora-rank
LR_LORA = 3e-3       # of train_lora, train_qlora and `fastlora train --lora-rank R` (only the adapters train)
LORA_TARGETS = ("q_proj", "v_proj")  # train_lora's and `fastlora train`'s target modules
EPOCHS = 3
