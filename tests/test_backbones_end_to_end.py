"""Every backbone through the command-line paths a user takes: a pipeline saved to disk, `prepare`
with its VAE, `train` from the shards, the trained checkpoint scored by the Scorer, and `eval`."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import reset_accelerate
from dina_lrm import Scorer
from dina_lrm.rewards import flow_grpo_latent_reward, flow_grpo_reward
from dina_lrm.cli import main
from dina_lrm.config import DiNaConfig
from dina_lrm.data.prepare import PrepareConfig, prepare
from dina_lrm.data.shards import load_preference_shards
from dina_lrm.eval.runner import EvalConfig, evaluate
from dina_lrm.pipelines import load_pipeline
from dina_lrm.serve.client import RewardClient
from dina_lrm.serve.server import ServeConfig, load_service, make_server
from dina_lrm_toyworld.benchmark import write_toy_benchmark
from dina_lrm.train.trainer import train
from dina_lrm.testing.tiny_flux import build_tiny_flux_pipeline
from dina_lrm.testing.tiny_qwenimage import build_tiny_qwenimage_pipeline
from dina_lrm.testing.tiny_zimage import build_tiny_zimage_pipeline

TAPS = {"num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [1, 3], "lora_config": {"r": 4, "lora_alpha": 8},
        "reward_head": {"num_attn_heads": 2, "width": 64, "use_proj_in": True}}
BACKBONES = {  # name: (pipeline builder, text tokens, latent channels)
    "flux": (build_tiny_flux_pipeline, 16, 4),
    "zimage": (build_tiny_zimage_pipeline, 64, 4),
    "qwenimage": (build_tiny_qwenimage_pipeline, 256, 4),
}


def pipeline_embeddings(name, pipe, prompts, tokens):
    """The text an RL trainer holds: the pipeline's own encode_prompt outputs, in each pipeline's form."""
    if name == "flux":
        states, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=tokens)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}
    if name == "zimage":  # a list of per-prompt (tokens, width) tensors, no pooled embedding
        return {"prompt_embeds": pipe._encode_prompt(list(prompts), device="cpu", max_sequence_length=tokens)}
    states, mask = pipe.encode_prompt(list(prompts), device="cpu", max_sequence_length=tokens)  # Qwen-Image: mask None if unpadded
    return {"prompt_embeds": states, "pooled_prompt_embeds": mask}


def served_scores(reward_dir, pipeline_dir, latents, prompts, scorer):
    """Raw scores over HTTP (loopback, a free port): prompts in the metadata, then the embeddings and
    the second text tensor (pooled embedding or text mask) as tensors."""
    service = load_service(ServeConfig(reward=str(reward_dir), model=str(pipeline_dir)))
    httpd = make_server(service)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = RewardClient(f"http://127.0.0.1:{httpd.server_address[1]}")
        assert client.metadata()["backbone"] == scorer.model.backbone_name
        by_prompts = client.score(latents, prompts=prompts, u=0.4, seeds=[7, 8])["raw_scores"]
        states, second = scorer.prompt_encoder(prompts)
        by_embeds = client.score(latents, prompt_embeds=states, pooled_prompt_embeds=second, u=0.4, seeds=[7, 8])["raw_scores"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()
    return np.array(by_prompts), np.array(by_embeds)


def write_pairs(directory, count=6):
    rng, rows = np.random.default_rng(0), []
    for i in range(count):
        for k in range(2):
            Image.fromarray((rng.random((64, 48, 3)) * 255).astype(np.uint8)).save(directory / f"img{i}_{k}.png")
        rows.append({"prompt": f"a red circle {'and a square ' * i}", "chosen": f"img{i}_0.png", "rejected": f"img{i}_1.png"})
    (directory / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_prepare_train_score_and_eval(name, tmp_path, capsys):
    build, tokens, channels = BACKBONES[name]
    build().save_pretrained(tmp_path / "pipe")
    write_pairs(tmp_path)
    prepare(PrepareConfig(format="generic", input=str(tmp_path / "data.jsonl"), out=str(tmp_path / "shards"), model=str(tmp_path / "pipe"),
                          reference_size=64, cache_prompt_embeds=True, max_sequence_length=tokens))
    pairs = load_preference_shards(tmp_path / "shards")
    assert pairs.chosen.shape[1] == channels and pairs.chosen.shape[2] % 2 == 0 and pairs.chosen.shape[3] % 2 == 0
    raw = {"model": {**TAPS, "backbone": name, "backbone_model_id": str(tmp_path / "pipe")},
           "training": {"mixed_precision": "fp32", "max_steps": 2},
           "data": {"train": {"parquet_files": str(tmp_path / "shards"), "base_batch_size": 2, "max_sequence_length": tokens}},
           "paths": {"run_name": name, "save_dir": str(tmp_path / "runs")}, "logging": {"report_to": "none", "save_frac": 2, "log_every": 1}}
    try:
        final = train(DiNaConfig.from_dict(raw))
    finally:
        reset_accelerate()
    scorer = Scorer.from_pretrained(final, tmp_path / "pipe")
    assert scorer.model.backbone_name == name and scorer.prompt_encoder.max_sequence_length == tokens
    scores = scorer.score(["a red circle", "a red circle and a square"], images=[str(tmp_path / "img0_0.png")] * 2, u=0.1, seed=0).raw
    assert torch.isfinite(scores).all()
    capsys.readouterr()
    assert main(["score", "--reward", str(final), "--model", str(tmp_path / "pipe"), "--json", "--prompt", "a red circle",
                 str(tmp_path / "img0_0.png")]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["scores"][0]["raw"])
    rl_reward = flow_grpo_latent_reward(final, tmp_path / "pipe", u=0.4, seed=0, max_sequence_length=tokens)("cpu")
    latents = torch.cat(scorer.encode_images([str(tmp_path / "img0_0.png"), str(tmp_path / "img1_0.png")]))
    prompts = ["a red circle", "a red circle and a square"]
    by_prompts, _ = rl_reward(latents, prompts)
    by_embeds, _ = rl_reward(latents, prompts, **pipeline_embeddings(name, load_pipeline(tmp_path / "pipe"), prompts, tokens))
    np.testing.assert_allclose(by_embeds, by_prompts, rtol=1e-5, atol=1e-6)
    by_images, _ = flow_grpo_reward(final, tmp_path / "pipe", u=0.4, seed=0, max_sequence_length=tokens)("cpu")(
        [str(tmp_path / "img0_0.png"), str(tmp_path / "img1_0.png")], prompts)
    np.testing.assert_allclose(by_images, by_prompts, rtol=1e-5, atol=1e-6)
    served_by_prompts, served_by_embeds = served_scores(final, tmp_path / "pipe", latents, prompts, scorer)
    np.testing.assert_allclose(served_by_prompts, scorer.score(prompts, latents=latents, u=0.4, seeds=[7, 8]).raw.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served_by_embeds, served_by_prompts, rtol=1e-5, atol=1e-6)
    bench = write_toy_benchmark(tmp_path / "bench", prompts=3, images_per_prompt=3, seed=2)
    summary = evaluate(EvalConfig(format="hpdv2", input=str(bench), out=str(tmp_path / "out"), reward=str(final), model=str(tmp_path / "pipe"),
                                  reference_size=64, u_values=[0.3], draws=[], level_sets=[[0.2, 0.5]], bootstrap_resamples=20))
    assert summary["benchmark"]["pairs"] > 0 and set(summary["settings"]) == {"DiNa-LRM u=0.3", "DiNa-LRM levels 0.2+0.5"}
    assert all(0 <= s["accuracy"] <= 1 and s["gflops_per_image"] > 0 for s in summary["settings"].values())
