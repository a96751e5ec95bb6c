"""Backbones, the fine-tuning methods and the QA loss."""

from spanflow.models.qlora import quiet_hub_kernel_note

quiet_hub_kernel_note()  # PEFT imports bitsandbytes whenever it is installed: quiet its note before any of that
