"""What a scoring setting costs: analytic FLOPs per image, and measured peak memory.

FLOPs count a multiply-add as 2 and cover every matrix product and attention of the kept backbone
blocks (LoRA included), the patch embedding and the reward head, from the modules' own shapes.
The text encoders are left out: a prompt is encoded once for all images of its group.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dina_lrm.eval.reward_fn import Setting
from dina_lrm.models.backbone import attention_flops, linear_flops
from dina_lrm.models.reward_model import DiNaLRM


def backbone_flops(model: DiNaLRM, image_tokens: int, text_tokens: int) -> int:
    """One backbone pass over one image (each backbone counts its own modules)."""
    return model.base_backbone.flops(image_tokens, text_tokens)


def head_flops(model: DiNaLRM, image_tokens: int, text_tokens: int, levels: int) -> int:
    """The reward head reading ``levels`` noise levels' tokens of one image."""
    head = model.reward_head
    queries, width = head.query_tokens.shape[1:]
    use_text = head.agg_text is not None

    def per_level(name: str) -> int:
        if "cond_mlp" in name:
            return 1
        return text_tokens if "text" in name else image_tokens

    def per_score(name: str) -> int:
        if "_vis" in name:
            return levels * image_tokens
        if "_text" in name:
            return levels * text_tokens
        return queries

    adapters = nn.ModuleDict({"layer_adapters_visual": head.layer_adapters_visual, "layer_adapters_text": head.layer_adapters_text,
                              "agg_visual": head.agg_visual, **({"agg_text": head.agg_text} if use_text else {})})
    scoring = nn.ModuleDict({"attn1": head.attn1, "attn2": head.attn2, "ff": head.ff, "head": head.head})
    attention = attention_flops(queries, levels * (2 * image_tokens + (text_tokens if use_text else 0)), width)
    return levels * linear_flops(adapters, per_level) + linear_flops(scoring, per_score) + attention


def scoring_flops(model: DiNaLRM, latent_shape: tuple[int, int, int], text_tokens: int, setting: Setting) -> int:
    """FLOPs to score one image of ``latent_shape`` (C, H, W) under ``setting``."""
    backbone = model.base_backbone
    image_tokens = (latent_shape[1] // backbone.patch_size) * (latent_shape[2] // backbone.patch_size)
    levels = len(setting.levels)
    read = backbone.feature_tokens(image_tokens, text_tokens)
    one_draw = levels * backbone_flops(model, image_tokens, text_tokens) + head_flops(model, *read, levels)
    return setting.draws * one_draw


def _resident_bytes() -> int:
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMeter:
    """Peak memory while the block runs: CUDA's peak allocation on a GPU; on CPU the process's
    resident set, sampled every 5 ms (the allocator may keep freed memory, so this is an upper bound)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, _resident_bytes())

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _resident_bytes())

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def count_flops(fn) -> int:
    """FLOPs that torch's counter sees while ``fn()`` runs (its backward too, if it calls one)."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()
