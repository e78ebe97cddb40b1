"""What a scoring setting costs: analytic FLOPs per image, and the memory a device holds, predicted.

FLOPs count a multiply-add as 2 and cover every matrix product and attention of the kept backbone
blocks (LoRA included), the patch embedding and the reward head, from the modules' own shapes.
The text encoders are left out: a prompt is encoded once for all images of its group.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from dina_lrm.rewards import Setting
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


def count_flops(fn) -> int:
    """FLOPs that torch's counter sees while ``fn()`` runs (its backward too, if it calls one)."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


class LiveActivations(TorchDispatchMode):
    """Peak bytes of the tensors an operation sequence keeps alive at once, followed through their
    garbage collection; works on the ``meta`` device and on fake tensors. A storage counts from the op
    that creates it until the last tensor on it dies: a view (e.g. a weight's gradient, the transpose
    of a matrix product) keeps its base's bytes alive; in-place results hold no new memory."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.owners: dict[int, list[int]] = {}  # storage -> [size, tensors on it that are alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        views = any(result.alias_info is not None for result in func._schema.returns)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            if key in self.owners:
                self.owners[key][1] += 1
            elif views:
                continue  # a view of a tensor made before counting began
            else:
                self.owners[key] = [tensor.untyped_storage().nbytes(), 1]
                self.live += self.owners[key][0]
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.owners[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.owners[key]


class _FlashAttention(torch.autograd.Function):
    """Scaled dot-product attention that keeps what a fused (flash) kernel keeps for its backward -
    q, k, v, the output and the log-sum-exp - and recomputes the attention there; the meta device's
    own SDPA is the unfused math path, which would keep the full attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        ctx.kwargs = kwargs
        out = _ORIGINAL_SDPA(query, key, value, **kwargs)
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
            out = _ORIGINAL_SDPA(*inputs, **ctx.kwargs)
            needed = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, needed, grad))
        return (*[next(grads) if t.requires_grad else None for t in inputs], None)


_ORIGINAL_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextmanager
def flash_attention(compute: bool = True):
    """Within: every ``F.scaled_dot_product_attention`` keeps only what a flash kernel keeps. With
    ``compute=False`` it only allocates its output (no attention matrix, no FLOPs): the memory of a
    fused forward."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not compute:
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return _FlashAttention.apply(query, key, value, kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _ORIGINAL_SDPA


@dataclass
class ModuleCost:
    """What one call of a module costs, measured on the ``meta`` device (nothing is allocated)."""

    forward_flops: int
    backward_flops: int  # gradient to the input only (the module's weights frozen, as a reward in ReFL)
    parameter_bytes: int
    saved_activation_bytes: int  # kept by autograd between the forward and the backward
    forward_activation_bytes: int  # peak of live activations in a forward without autograd


def module_cost(module: nn.Module, make_input: Callable[[], torch.Tensor], call: Callable | None = None) -> ModuleCost:
    """Cost of ``call(module, input)`` (default ``module(input)``, its output's sum as the loss) for a
    module built on the ``meta`` device; ``make_input`` builds the input there. FLOPs count a
    multiply-add as 2 (torch's counter); attention is accounted as a fused kernel keeps it
    (:func:`flash_attention`), so its backward FLOPs include the recomputed attention."""
    call = call or (lambda m, x: m(x))
    module.requires_grad_(False)
    with torch.no_grad(), flash_attention(compute=False), LiveActivations() as live:
        call(module, make_input())
    forward = count_flops(lambda: call(module, make_input()))
    saved = []

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter):  # weights are counted once, above
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    x = make_input().requires_grad_(True)
    with FlopCounterMode(display=False) as counter, flash_attention():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = call(module, x)
        forward_with_graph = counter.get_total_flops()
        _sum(out).backward()
    return ModuleCost(forward, counter.get_total_flops() - forward_with_graph,
                      sum(p.numel() * p.element_size() for p in module.parameters()), sum(saved), live.peak)


def _sum(out) -> torch.Tensor:
    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    return sum(t.float().sum() for t in tensors)


# Memory: what a device holds for a reward, predicted without allocating ---------------------------


@dataclass
class MemoryEstimate:
    """Bytes a device holds: ``weights`` (parameters and buffers, each storage once: SD3's position table
    included; with ``optimizer``: AdamW's two moments of the trained weights) and ``peak`` (the most
    bytes the call itself allocates and keeps alive at once: activations, what autograd saves, gradients)."""

    weights: int
    peak: int
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.peak


def held_bytes(*modules: nn.Module) -> int:
    """Bytes of the modules' parameters and buffers, a storage shared by several tensors counted once."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@contextmanager
def simulated(model: nn.Module, device: str = "cpu"):
    """Within: ``model``, built on the ``meta`` device, runs as it would on ``device`` - that device's
    kernels (e.g. CPU flash attention), its autocast policy, autograd - on fake tensors that allocate
    nothing (create inputs inside). Input checks that read values are skipped; the meta tensors are back
    afterwards."""
    mode = FakeTensorMode()
    originals = []
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is None:
                    continue
                fake = FakeTensor(mode, tensor.data, torch.device(device))
                getattr(module, kind)[name] = nn.Parameter(fake, tensor.requires_grad) if kind == "_parameters" else fake
                originals.append((module, kind, name, tensor))
    checks = [m for m in model.modules() if hasattr(m, "check_inputs")]
    for m in checks:
        m.check_inputs = lambda *args, **kwargs: None
    try:
        with mode:
            yield
    finally:
        for module, kind, name, tensor in originals:
            getattr(module, kind)[name] = tensor
        for m in checks:
            del m.check_inputs


def _text_inputs(model: DiNaLRM, batch: int, text_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = model.base_backbone
    states = torch.randn(batch, text_tokens, backbone.text_width, dtype=dtype)
    pooled = torch.ones(batch, text_tokens, dtype=dtype) if backbone.pooled_width is None else torch.randn(batch, backbone.pooled_width, dtype=dtype)
    return states, pooled


def scoring_memory(model: DiNaLRM, latent_shape: tuple[int, int, int], text_tokens: int, levels: int = 1, batch: int = 1,
                   max_batch_items: int | None = None) -> MemoryEstimate:
    """What scoring ``batch`` latents of ``latent_shape`` at ``levels`` noise levels holds (``model`` on meta,
    in its scoring dtype): its weights, and the forward's peak of live tensors."""
    with simulated(model), LiveActivations() as live, torch.no_grad():
        latents = torch.randn(levels, batch, *latent_shape, dtype=model.dtype)
        states, pooled = _text_inputs(model, batch, text_tokens, model.dtype)
        model.forward_ensemble(latents, states, pooled, torch.full((levels,), 500.0), max_batch_items)
    return MemoryEstimate(held_bytes(model), live.peak)


def training_memory(model: DiNaLRM, latent_shape: tuple[int, int, int], text_tokens: int, pairs: int,
                    autocast: torch.dtype | None = None) -> MemoryEstimate:
    """What one preference step over ``pairs`` pairs holds (``model`` on meta as the trainer builds it:
    frozen weights in their dtype, trained ones in float32; gradient checkpointing as enabled on it):
    its weights, AdamW's moments, and the peak of the forward and backward (activations, what autograd
    saves - LoRA's and the head's inputs included - and the gradients). The moments are allocated by the
    first optimizer step, after the backward's peak; from the second step on, both are held at once."""
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    with simulated(model), LiveActivations() as live:
        dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
        latents = torch.randn(2 * pairs, *latent_shape, dtype=dtype)
        states, pooled = _text_inputs(model, 2 * pairs, text_tokens, dtype)
        with torch.autocast("cpu", autocast) if autocast else nullcontext():
            scores = model(latents, states, pooled, torch.full((2 * pairs,), 500.0))[:, 0]
        (scores[:pairs] - scores[pairs:]).float().mean().backward()  # the loss itself: a few scalars per pair
    return MemoryEstimate(held_bytes(model), live.peak, optimizer=2 * trained)
