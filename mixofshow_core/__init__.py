"""Mix-of-Show math with no ComfyUI import: formats, fusion, regions, training."""
