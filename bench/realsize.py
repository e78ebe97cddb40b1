"""A real-size rehearsal without a GPU or a download: SD3.5-Medium's whole pipeline at its published
sizes (24-layer MMDiT, CLIP-L, CLIP-G, T5-XXL's encoder, VAE) with seeded random weights saved in bf16,
and the release's 12-layer reward on it. Each measurement runs in its own process and reads the peak of
the process's anonymous memory (sampled every 5 ms, minus what the process held before): bf16 files
loaded in float32 are copies, as on an accelerator, and the pages of memory-mapped safetensors files,
which a device would not hold, are left out. Beside each: the cost model's prediction
(``dina_lrm.eval.cost``: the reward built on the meta device, its step run on fake CPU tensors that
allocate nothing) and, for the load, today's whole-transformer load ("naive").

    python bench/realsize.py --backbone sd3 [--work DIR] [--only load score train serve] [--train-dtype float32]
    python bench/realsize.py --backbone flux      # and zimage: on the meta device only (too large here)

By default glibc maps every allocation of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so the
resident set follows the live tensors, as a device allocator's peak does; ``--allocator default`` shows
glibc's own behaviour, whose heap keeps freed blocks (a training step then looks 1.5x larger).
Measured on this machine's 2 CPU cores; the first run writes the pipeline (about 16 GB) under --work.
The training step runs in float32 by default: this CPU has no bf16 matrix units, where a step at
SD3.5-M's size takes hours; ``--train-dtype bfloat16`` runs the trainer's bf16 recipe (frozen weights in
bf16, LoRA and head in float32, autocast), whose prediction ``tests/test_cost_at_scale.py`` checks against
a counted real step at tiny size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from backbone_params import RELEASES, SD35_MEDIUM  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "configs"
TEXT_TOKENS = 77 + 128  # SD3's prompt embedding: CLIP's 77 tokens and T5's 128
SD35_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, shift_factor=0.0609,
                scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, vocab_size=49408)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, vocab_size=49408,
              hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False)
SCORES = {"score 512^2": (512, 1), "score 512^2, 3 levels": (512, 3), "score 1024^2": (1024, 1), "score 1024^2, 3 levels": (1024, 3)}
GIB = 2**30


# Building the pipeline ----------------------------------------------------------------------------

def seeded(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``module`` (built on meta) materialised in ``dtype`` with seeded weights: matrices N(0, 0.02),
    norm scales 1, biases 0 (random weights at these scales keep every activation finite)."""
    module = module.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def build_pipeline(directory: Path) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dina_lrm.testing.tiny_sd3 import clip_tokenizer, t5_tokenizer

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    pipe = StableDiffusion3Pipeline(
        transformer=seeded(transformer, 0), vae=AutoencoderKL(**SD35_VAE).to(torch.bfloat16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=seeded(clip_l, 1), tokenizer=clip_tokenizer(),
        text_encoder_2=seeded(clip_g, 2), tokenizer_2=clip_tokenizer(), text_encoder_3=seeded(t5, 3), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(str(directory))


def build_reward(directory: Path, pipeline: Path) -> None:
    """The release's 12-layer config on the pipeline's transformer, with seeded LoRA and head."""
    from dina_lrm import DiNaLRM, load_config
    from dina_lrm.pipelines import load_kept_transformer

    config = load_config(CONFIGS / "sd35m-thurstone-12layer.yaml")
    transformer = load_kept_transformer(pipeline, lambda t: DiNaLRM.kept_modules(config, t), torch.bfloat16)
    model = DiNaLRM(config, transformer)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(directory)


# Measurements, one per process ---------------------------------------------------------------------

def measure(name: str, work: Path, train_dtype: str) -> dict:
    import diffusers  # noqa: F401  (imported before the baseline: the libraries' own memory is not the model's)
    import transformers  # noqa: F401

    import dina_lrm.scorer  # noqa: F401
    import dina_lrm.serve.server  # noqa: F401
    import dina_lrm.train.step  # noqa: F401
    from dina_lrm.memory import MemoryMeter, anonymous_bytes

    gc.collect()
    before = anonymous_bytes()
    started = time.perf_counter()
    with MemoryMeter("cpu", anonymous=True) as meter:
        held = MEASUREMENTS[name.split(" ")[0]](name, work, train_dtype)
    return {"name": name, "peak_bytes": meter.peak_bytes - before, "seconds": round(time.perf_counter() - started, 1), **held}


def measure_load(name: str, work: Path, train_dtype: str) -> dict:
    from dina_lrm import Scorer
    from dina_lrm.eval.cost import held_bytes
    from dina_lrm.pipelines import load_pipeline
    from dina_lrm.scorer import TEXT_COMPONENTS

    if name == "load":
        scorer = Scorer.from_pretrained(work / "reward", work / "pipeline", text_encoders="none")
    else:  # today's leanest load before: the whole transformer, no text encoders, the reward built on it
        scorer = Scorer.from_pipeline(work / "reward", load_pipeline(work / "pipeline", skip=TEXT_COMPONENTS), text_encoders=False)
    return {"kept_bytes": held_bytes(scorer.model), "vae_bytes": held_bytes(scorer.vae)}


def measure_score(name: str, work: Path, train_dtype: str) -> dict:
    from dina_lrm import Scorer

    scorer = Scorer.from_pretrained(work / "reward", work / "pipeline", text_encoders="none")
    resolution, levels = SCORES[name]
    side = resolution // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, side, side, generator=generator)
    states, pooled = torch.randn(1, TEXT_TOKENS, 4096, generator=generator), torch.randn(1, 2048, generator=generator)
    noise_levels = [0.2, 0.5, 0.7] if levels == 3 else [0.4]
    raw = scorer.score(latents=latents, prompt_embeds=states, pooled_prompt_embeds=pooled, noise_levels=noise_levels, seed=0).raw
    return {"score": float(raw[0])}


def measure_train(name: str, work: Path, train_dtype: str) -> dict:
    from dina_lrm import DiNaLRM, load_config
    from dina_lrm.pipelines import load_kept_transformer
    from dina_lrm.train.step import PairNoise, PreferenceBatch, preference_forward

    config = load_config(CONFIGS / "sd35m-thurstone-12layer.yaml")
    model = DiNaLRM(config, load_kept_transformer(work / "pipeline", lambda t: DiNaLRM.kept_modules(config, t)))
    half = train_dtype == "bfloat16"
    if half:  # the trainer's recipe: frozen weights in bf16, the trained ones in float32, autocast
        model.to(torch.bfloat16)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    model.enable_gradient_checkpointing("checkpointing" in name)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6)
    for parameter in trained:  # the moments exist from the first step on: allocate them before the measured one
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if half else torch.float32
    batch = PreferenceBatch(chosen=torch.randn(1, 16, 64, 64, generator=generator).to(dtype),
                            rejected=torch.randn(1, 16, 64, 64, generator=generator).to(dtype),
                            encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, generator=generator).to(dtype),
                            pooled_projections=torch.randn(1, 2048, generator=generator).to(dtype), target=torch.ones(1))
    noise = PairNoise(torch.tensor([0.5]), torch.tensor([500.0]), torch.randn(1, 16, 64, 64, generator=generator))
    with torch.autocast("cpu", torch.bfloat16, enabled=half):
        out = preference_forward(model, batch, noise)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    return {"loss": float(out.loss)}


def measure_serve(name: str, work: Path, train_dtype: str) -> dict:
    import threading

    from dina_lrm import RewardClient, ServeConfig
    from dina_lrm.serve.server import load_service, make_server

    service = load_service(ServeConfig(reward=str(work / "reward"), model=str(work / "pipeline"), text_encoders="none", port=0))
    server = make_server(service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    generator = torch.Generator().manual_seed(0)
    reply = RewardClient(f"http://127.0.0.1:{server.server_address[1]}").score(
        torch.randn(1, 16, 64, 64, generator=generator), prompt_embeds=torch.randn(1, TEXT_TOKENS, 4096, generator=generator),
        pooled_prompt_embeds=torch.randn(1, 2048, generator=generator), seeds=[0])
    server.shutdown()
    service.close()
    return {"score": reply["raw_scores"][0]}


MEASUREMENTS = {"load": measure_load, "load-naive": measure_load, "score": measure_score, "train": measure_train,
                "serve": measure_serve}


# Predictions ---------------------------------------------------------------------------------------

def meta_reward(transformer_class, transformer_config: dict, reward: dict, dtype: torch.dtype = torch.float32):
    from dina_lrm import DiNaConfig, DiNaLRM

    with torch.device("meta"):
        transformer = transformer_class(**transformer_config)
        model = DiNaLRM(DiNaConfig.from_dict({"model": reward}), transformer)
    return model.to(dtype), transformer


def vae_bytes() -> int:
    from diffusers import AutoencoderKL

    from dina_lrm.eval.cost import held_bytes

    with torch.device("meta"):
        return held_bytes(AutoencoderKL(**SD35_VAE))


def predictions(train_dtype: str) -> dict:
    """The cost model's bytes for every measurement (SD3.5-M, the release's config, float32 scoring)."""
    from diffusers import SD3Transformer2DModel

    from dina_lrm import load_config
    from dina_lrm.eval.cost import held_bytes, scoring_memory, training_memory

    reward = load_config(CONFIGS / "sd35m-thurstone-12layer.yaml").to_dict()["model"]
    model, _ = meta_reward(SD3Transformer2DModel, SD35_MEDIUM, reward)
    largest = max(p.numel() for p in model.base_backbone.parameters()) * 2  # one bf16 tensor read while its float32 copy is made
    load = held_bytes(model) + vae_bytes() + largest
    out = {"load": load, "load-naive": None}
    for name, (resolution, levels) in SCORES.items():
        out[name] = scoring_memory(model, (16, resolution // 8, resolution // 8), TEXT_TOKENS, levels).total + vae_bytes()
    for checkpointing in (False, True):
        trained, _ = meta_reward(SD3Transformer2DModel, SD35_MEDIUM, reward)
        if train_dtype == "bfloat16":
            trained.to(torch.bfloat16)
            for parameter in trained.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        trained.enable_gradient_checkpointing(checkpointing)
        estimate = training_memory(trained, (16, 64, 64), TEXT_TOKENS, 1, torch.bfloat16 if train_dtype == "bfloat16" else None)
        out["train 512^2" + (", checkpointing" if checkpointing else "")] = estimate.total
    out["serve"] = load + scoring_memory(model, (16, 64, 64), TEXT_TOKENS, 1).peak
    return out


def meta_accounting(backbone: str) -> list[dict]:
    """FLUX.1-dev or Z-Image-Turbo at its real size, on the meta device only: the whole transformer, what
    the reward keeps, and scoring's peak (Z-Image's text mask decides its padding from values, which
    tensors that allocate nothing lack: its scoring peak is not simulated)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from dina_lrm.eval.cost import held_bytes, scoring_memory

    label = next(name for name in RELEASES if name.lower().replace("-", "").startswith(backbone))
    transformer_class, config, reward, text_tokens = RELEASES[label]
    model, transformer = meta_reward(transformer_class, config, reward)
    rows = []
    for resolution in (512, 1024):  # every backbone takes unpacked VAE latents (16, H/8, W/8)
        try:
            peak = scoring_memory(model, (16, resolution // 8, resolution // 8), text_tokens, 1).peak / GIB
        except DataDependentOutputException:
            peak = None
        rows.append({"model": label, "resolution": resolution, "whole_transformer_gib": held_bytes(transformer) / GIB,
                     "kept_gib": held_bytes(model) / GIB, "score_peak_gib": peak})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["sd3", "flux", "zimage"], default="sd3")
    parser.add_argument("--work", default="bench_out/realsize", help="where the pipeline and reward are written (kept between runs)")
    parser.add_argument("--only", nargs="+", choices=["load", "score", "train", "serve"], default=["load", "score", "train", "serve"])
    parser.add_argument("--train-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--allocator", choices=["per-tensor", "default"], default="per-tensor",
                        help="per-tensor: glibc maps every allocation of 64 KiB or more on its own and unmaps it when freed, so the "
                             "resident set follows the live tensors (as a device allocator's peak does); default: glibc as it is, "
                             "whose heap keeps freed blocks")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()
    work = Path(args.work)
    if args.measure:
        print(json.dumps(measure(args.measure, work, args.train_dtype)))
        return
    if args.backbone != "sd3":
        for row in meta_accounting(args.backbone):
            print(json.dumps(row))
        return
    if not (work / "pipeline" / "model_index.json").is_file():
        print("writing SD3.5-M's pipeline at its real sizes (seeded random weights, bf16) ...", flush=True)
        build_pipeline(work / "pipeline")
    if not (work / "reward" / "config.json").is_file():
        build_reward(work / "reward", work / "pipeline")
    names = {"load": ["load", "load-naive"], "score": list(SCORES), "serve": ["serve"],
             "train": ["train 512^2", "train 512^2, checkpointing"]}
    predicted = predictions(args.train_dtype)
    results = []
    for name in [n for group in args.only for n in names[group]]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.allocator == "per-tensor" else {})}
        done = subprocess.run([sys.executable, __file__, "--work", str(work), "--train-dtype", args.train_dtype, "--measure", name],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["predicted_bytes"] = predicted.get(name)
        results.append(result)
        print(row_text(result), flush=True)
    path = work / f"results-{args.allocator}-{args.train_dtype}.json"  # rows of earlier runs with other --only kept
    earlier = json.loads(path.read_text())["results"] if path.is_file() else []
    merged = [r for r in earlier if r["name"] not in {n["name"] for n in results}] + results
    path.write_text(json.dumps({"train_dtype": args.train_dtype, "allocator": args.allocator, "results": merged}, indent=1))
    print(table(merged))


def row_text(result: dict) -> str:
    predicted = result["predicted_bytes"]
    ratio = f"{result['peak_bytes'] / predicted:.3f}" if predicted else "-"
    return (f"{result['name']}: measured {result['peak_bytes'] / GIB:.2f} GiB, predicted "
            f"{predicted / GIB if predicted else float('nan'):.2f} GiB, measured/predicted {ratio}, {result['seconds']} s")


def table(results: list[dict]) -> str:
    lines = ["| measurement | measured peak GiB | predicted GiB | measured / predicted | peak / kept modules | seconds |",
             "|---|---|---|---|---|---|"]
    for r in results:
        predicted = r["predicted_bytes"]
        versus = f"{predicted / GIB:.2f} | {r['peak_bytes'] / predicted:.3f}" if predicted else "- | -"
        kept = f"{r['peak_bytes'] / r['kept_bytes']:.2f}x of {r['kept_bytes'] / GIB:.2f} GiB" if "kept_bytes" in r else ""
        lines.append(f"| {r['name']} | {r['peak_bytes'] / GIB:.2f} | {versus} | {kept} | {r['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
