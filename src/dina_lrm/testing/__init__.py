"""Tiny models for tests, built from configs in code with the same diffusers / transformers classes as
the real generators (SD3.5, FLUX, Z-Image, Qwen-Image), small enough for a CPU: the suite and the toy
world build their generators from them, save them, and load them through the real loading paths."""
