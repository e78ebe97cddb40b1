import copy
import json
import shutil

import pytest
import torch
from helpers import make_latents, randomize_lora, tiny_config
from peft import PeftModel

from dina_lrm import CheckpointError, DiNaLRM
from dina_lrm.noise import NoiseSampler, SigmaTable
from dina_lrm.train.step import PreferenceBatch, preference_step


def _fresh_transformer(pipe):
    return copy.deepcopy(pipe.transformer)


def _saved_without_manifest(pipe, directory, **overrides):
    """A checkpoint as the release ships them: no manifest, so only the readers' own checks apply."""
    DiNaLRM(tiny_config(**overrides), _fresh_transformer(pipe)).save_pretrained(directory)
    (directory / "manifest.json").unlink()
    return directory


def _overwrite_middle(path, data: bytes):
    """Overwrite ``len(data)`` bytes in the middle of a safetensors file's tensor data."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    middle = (data_start + len(raw)) // 2 // 4 * 4
    raw[middle:middle + len(data)] = data
    path.write_bytes(bytes(raw))


def lora_modules(model):
    return {n.split(".lora_")[0] for n, _ in model.base_backbone.named_parameters() if "lora_A" in n}


def test_forward_returns_one_score_per_latent(pipe, text_inputs):
    model = DiNaLRM(tiny_config(), pipe.transformer)
    scores = model(make_latents(), *text_inputs, torch.tensor([300.0, 700.0]))
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_lora_starts_as_identity(pipe, text_inputs):
    plain_transformer = _fresh_transformer(pipe)  # copied before PEFT injects LoRA into the shared blocks
    lora = DiNaLRM(tiny_config(), pipe.transformer)
    frozen = DiNaLRM(tiny_config(use_lora=False, freeze_backbone=True), plain_transformer)
    assert not any("lora_" in n for n, _ in frozen.named_parameters())
    frozen.reward_head.load_state_dict(lora.reward_head.state_dict())
    args = (make_latents(), *text_inputs, torch.tensor([400.0]))
    torch.testing.assert_close(lora(*args), frozen(*args), rtol=0, atol=0)
    assert any(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in frozen.backbone.named_parameters())


def test_lora_targets_and_last_block_exclusion(pipe):
    tapped = DiNaLRM(tiny_config(), _fresh_transformer(pipe))
    assert "transformer_blocks.2.attn.add_q_proj" in lora_modules(tapped)
    assert "transformer_blocks.0.attn2.to_q" in lora_modules(tapped)
    assert len(lora_modules(tapped)) == 3 * 8 + 3 * 4  # 8 joint-attention + 4 attn2 projections per block

    untapped = DiNaLRM(tiny_config(text_head_idx=[1, 2]), _fresh_transformer(pipe))
    names = lora_modules(untapped)
    for proj in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert f"transformer_blocks.2.attn.{proj}" not in names
        assert f"transformer_blocks.1.attn.{proj}" in names


def test_training_modes(pipe):
    full = DiNaLRM(tiny_config(use_lora=False, freeze_backbone=False), _fresh_transformer(pipe))
    assert not isinstance(full.backbone, PeftModel)
    assert all(p.requires_grad for p in full.backbone.parameters())
    frozen = DiNaLRM(tiny_config(use_lora=False, freeze_backbone=True), _fresh_transformer(pipe))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.reward_head.parameters())


def test_batched_ensemble_equals_per_level_loop(pipe, text_inputs):
    model = DiNaLRM(tiny_config(), pipe.transformer).eval()
    randomize_lora(model)
    latents = torch.stack([make_latents(seed=k) for k in range(3)])
    timesteps = torch.tensor([200.0, 500.0, 800.0])
    batched = model.forward_ensemble(latents, *text_inputs, timesteps)
    levels = []
    for k in range(3):
        out = model.backbone(latents[k], *text_inputs, timesteps[k].expand(2))
        levels.append((out.visual, out.text, out.temb))
    looped = model.reward_head.forward_ensemble(levels)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    as_lists = model.forward_ensemble(list(latents), *text_inputs, [t.expand(2) for t in timesteps])  # the authors' form
    torch.testing.assert_close(as_lists, batched, rtol=0, atol=0)
    single = model.forward_ensemble(latents[:1], *text_inputs, timesteps[:1])
    torch.testing.assert_close(single, model(latents[0], *text_inputs, timesteps[0]), rtol=1e-5, atol=1e-6)
    for bound in (1, 2, 4, 6, 100):  # split the batch, one level per pass, several levels, all levels at once
        bounded = model.forward_ensemble(latents, *text_inputs, timesteps, max_batch_items=bound)
        torch.testing.assert_close(bounded, looped, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch_items must be >= 1"):
        model.forward_ensemble(latents, *text_inputs, timesteps, max_batch_items=0)


@pytest.mark.parametrize("overrides", [{}, {"use_lora": False, "freeze_backbone": False}, {"use_lora": False, "freeze_backbone": True}])
def test_save_load_round_trip_gives_identical_scores(pipe, text_inputs, tmp_path, overrides):
    model = DiNaLRM(tiny_config(**overrides), _fresh_transformer(pipe)).eval()
    randomize_lora(model)
    if overrides.get("use_lora") is False and not overrides.get("freeze_backbone"):
        with torch.no_grad():
            model.base_backbone.transformer_blocks[0].attn.to_q.weight.add_(0.05)
    model.save_pretrained(tmp_path)
    loaded = DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))
    args = (make_latents(), *text_inputs, torch.tensor([400.0]))
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "checkpoint" / "rm_head.safetensors").is_file()


def test_our_rm_head_pt_is_the_release_format_and_loads_identically(pipe, text_inputs, tmp_path):
    """save_pretrained writes rm_head.pt as the release has it (a plain state dict that the authors'
    inference code loads with torch.load); our reader gives the same scores from either file."""
    model = DiNaLRM(tiny_config(), _fresh_transformer(pipe)).eval()
    randomize_lora(model)
    model.save_pretrained(tmp_path)
    release_head = torch.load(tmp_path / "checkpoint" / "rm_head.pt", map_location="cpu", weights_only=True)
    assert release_head.keys() == model.reward_head.state_dict().keys()
    args = (make_latents(), *text_inputs, torch.tensor([400.0]))
    from_safetensors = DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))(*args)
    (tmp_path / "checkpoint" / "rm_head.safetensors").unlink()
    (tmp_path / "manifest.json").unlink()  # the release's layout
    from_pt = DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))(*args)
    torch.testing.assert_close(from_pt, model(*args), rtol=0, atol=0)
    torch.testing.assert_close(from_safetensors, from_pt, rtol=0, atol=0)


def test_release_full_model_pt_loads(pipe, text_inputs, tmp_path):
    config = tiny_config(use_lora=False, freeze_backbone=False)
    model = DiNaLRM(config, _fresh_transformer(pipe)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "checkpoint" / "rm_head.safetensors").unlink()
    (tmp_path / "checkpoint" / "backbone.safetensors").unlink()
    (tmp_path / "manifest.json").unlink()  # the release's layout
    torch.save(model.state_dict(), tmp_path / "checkpoint" / "full_model.pt")
    loaded = DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))
    args = (make_latents(), *text_inputs, torch.tensor([400.0]))
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)


def test_one_thurstone_step_raises_the_margin(pipe, text_inputs):
    torch.manual_seed(0)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    batch = PreferenceBatch(make_latents(seed=1), make_latents(seed=2), *text_inputs)
    table, sampler = SigmaTable.from_scheduler(pipe.scheduler), NoiseSampler("constant", value=0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def margin():
        out = preference_step(model, batch, table, sampler, generator=torch.Generator().manual_seed(5))
        return out, (out.chosen_scores - out.rejected_scores).mean().item()

    out, before = margin()
    assert out.loss.item() == pytest.approx(0.29, abs=0.05)  # 1 - sqrt(1/2) for an untrained head
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    _, after = margin()
    assert after > before


def test_shared_sigma_and_noise_for_chosen_and_rejected(pipe, text_inputs):
    model = DiNaLRM(tiny_config(), pipe.transformer).eval()
    latents = make_latents(seed=3)
    batch = PreferenceBatch(latents, latents.clone(), *text_inputs)
    table = SigmaTable.from_scheduler(pipe.scheduler)
    with torch.no_grad():
        out = preference_step(model, batch, table, NoiseSampler("uniform"), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.chosen_scores, out.rejected_scores)


class TestBadInput:
    def test_wrong_latent_channels(self, pipe, text_inputs):
        model = DiNaLRM(tiny_config(), pipe.transformer)
        with pytest.raises(ValueError, match="latents have 3 channels but the backbone expects 4"):
            model(torch.randn(2, 3, 8, 8), *text_inputs, torch.tensor([1.0]))

    def test_nan_latents(self, pipe, text_inputs):
        model = DiNaLRM(tiny_config(), pipe.transformer)
        latents = make_latents()
        latents[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            model(latents, *text_inputs, torch.tensor([1.0]))

    def test_text_embeddings_of_wrong_width(self, pipe):
        model = DiNaLRM(tiny_config(), pipe.transformer)
        with pytest.raises(ValueError, match="encoder_hidden_states has shape"):
            model(make_latents(), torch.randn(2, 20, 48), torch.randn(2, 64), torch.tensor([1.0]))

    def test_taps_beyond_layers_of_the_transformer(self, pipe):
        with pytest.raises(ValueError, match="has only 4 blocks"):
            DiNaLRM(tiny_config(num_transformer_layers=6, visual_head_idx=[6], text_head_idx=[6]), pipe.transformer)

    def test_text_tap_on_a_block_without_text_output(self, pipe):
        with pytest.raises(ValueError, match="outputs no text stream"):
            DiNaLRM(tiny_config(num_transformer_layers=4, visual_head_idx=[4], text_head_idx=[4]), pipe.transformer)

    def test_transformer_already_carrying_lora(self, pipe):
        DiNaLRM(tiny_config(), pipe.transformer)
        with pytest.raises(ValueError, match="already carries LoRA layers"):
            DiNaLRM(tiny_config(), pipe.transformer)

    def test_unknown_backbone(self, pipe):
        with pytest.raises(ValueError, match="unknown backbone 'flux9'"):
            DiNaLRM(tiny_config(backbone="flux9"), pipe.transformer)

    def test_missing_directory_config_and_head(self, pipe, tmp_path):
        with pytest.raises(FileNotFoundError):
            DiNaLRM.from_pretrained(tmp_path / "nope", pipe.transformer)
        tmp_path.joinpath("empty").mkdir()
        with pytest.raises(CheckpointError, match="config.json is missing"):
            DiNaLRM.from_pretrained(tmp_path / "empty", pipe.transformer)
        _saved_without_manifest(pipe, tmp_path / "m")
        (tmp_path / "m" / "checkpoint" / "rm_head.safetensors").unlink()
        (tmp_path / "m" / "checkpoint" / "rm_head.pt").unlink()
        with pytest.raises(CheckpointError, match="rm_head.safetensors.*rm_head.pt"):
            DiNaLRM.from_pretrained(tmp_path / "m", _fresh_transformer(pipe))

    def test_missing_lora_adapter(self, pipe, tmp_path):
        _saved_without_manifest(pipe, tmp_path)
        shutil.rmtree(tmp_path / "checkpoint" / "backbone_lora")
        with pytest.raises(CheckpointError, match="LoRA adapter weights missing"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))

    def test_corrupt_head_file(self, pipe, tmp_path):
        _saved_without_manifest(pipe, tmp_path)
        path = tmp_path / "checkpoint" / "rm_head.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(CheckpointError, match="corrupt"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))

    def test_head_for_another_backbone_width(self, pipe, tmp_path):
        _saved_without_manifest(pipe, tmp_path)
        path = tmp_path / "checkpoint" / "rm_head.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(str(path))
        state["attn1.to_q.weight"] = torch.zeros(64, 64)
        save_file(state, str(path))
        with pytest.raises(CheckpointError, match=r"shape mismatches \(attn1.to_q.weight: checkpoint \(64, 64\) vs model \(32, 32\)"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))

    def test_lora_adapter_for_other_layers(self, pipe, tmp_path):
        DiNaLRM(tiny_config(num_transformer_layers=2, visual_head_idx=[2], text_head_idx=[2]), _fresh_transformer(pipe)).save_pretrained(tmp_path / "two")
        _saved_without_manifest(pipe, tmp_path / "three")
        shutil.rmtree(tmp_path / "three" / "checkpoint" / "backbone_lora")
        shutil.copytree(tmp_path / "two" / "checkpoint" / "backbone_lora", tmp_path / "three" / "checkpoint" / "backbone_lora")
        with pytest.raises(CheckpointError, match="does not fit this backbone"):
            DiNaLRM.from_pretrained(tmp_path / "three", _fresh_transformer(pipe))


class TestDamagedCheckpoint:
    """Tried as a new user would: 64 bytes overwritten mid-file must never load, let alone score."""

    def test_our_checkpoints_carry_sha256_sums_that_name_a_damaged_file(self, pipe, tmp_path):
        DiNaLRM(tiny_config(), _fresh_transformer(pipe)).save_pretrained(tmp_path)
        listed = json.loads((tmp_path / "manifest.json").read_text())["files"]
        assert {"config.json", "checkpoint/rm_head.safetensors", "checkpoint/rm_head.pt",
                "checkpoint/backbone_lora/adapter_model.safetensors"} <= set(listed)
        lora = tmp_path / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
        _overwrite_middle(lora, bytes(range(64)))  # finite garbage: only the checksum can tell
        with pytest.raises(CheckpointError, match=r"adapter_model.safetensors is damaged: its SHA-256 differs"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))

    @pytest.mark.parametrize("file", ["checkpoint/backbone_lora/adapter_model.safetensors", "checkpoint/rm_head.safetensors"])
    def test_a_nan_weight_is_named_even_without_a_manifest(self, pipe, tmp_path, file):
        _saved_without_manifest(pipe, tmp_path)
        _overwrite_middle(tmp_path / file, b"\xff" * 64)  # 0xffffffff is a float32 NaN
        with pytest.raises(CheckpointError, match=rf"{file.split('/')[-1]} is damaged: tensor '.+' holds NaN or inf"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))

    def test_a_nan_weight_in_a_release_pickle_is_named(self, pipe, tmp_path):
        _saved_without_manifest(pipe, tmp_path)
        (tmp_path / "checkpoint" / "rm_head.safetensors").unlink()
        state = torch.load(tmp_path / "checkpoint" / "rm_head.pt", weights_only=True)
        key = next(iter(state))
        state[key][...] = float("inf")
        torch.save(state, tmp_path / "checkpoint" / "rm_head.pt")
        with pytest.raises(CheckpointError, match=rf"rm_head.pt is damaged: tensor '{key}' holds NaN or inf"):
            DiNaLRM.from_pretrained(tmp_path, _fresh_transformer(pipe))


def test_a_hub_id_loads_from_the_local_hub_cache_offline(pipe, text_inputs, tmp_path, monkeypatch):
    """Scorer/DiNaLRM.from_pretrained("owner/name") resolves through huggingface_hub; offline (as in
    every test) it reads the cache, laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--liuhuohuo--DiNa-LRM-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = DiNaLRM(tiny_config(), _fresh_transformer(pipe)).eval()
    randomize_lora(model)
    model.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = DiNaLRM.from_pretrained("liuhuohuo/DiNa-LRM-tiny", _fresh_transformer(pipe))
    args = (make_latents(), *text_inputs, torch.tensor([400.0]))
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not in the cache .* while the hub is offline or unreachable"):
        DiNaLRM.from_pretrained("liuhuohuo/not-downloaded", _fresh_transformer(pipe))
