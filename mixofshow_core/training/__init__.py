"""Single-client ED-LoRA training (Mix-of-Show stage 1) in plain torch: data, LoRA injection,
losses, the optimisation loop and its resumable state. No ComfyUI import."""
