import dataclasses
import json

import pytest

from dina_lrm import ConfigError, DiNaConfig, load_config

RELEASE_CONFIG = {
    "model": {
        "model_type": "thurstone",
        "backbone_model_id": "stabilityai/stable-diffusion-3.5-medium",
        "num_transformer_layers": 12,
        "freeze_backbone": False,
        "use_ema": True,
        "ema_decay": 0.995,
        "use_lora": True,
        "use_text_features": True,
        "lora_config": {"r": 64, "lora_alpha": 128, "init_lora_weights": "gaussian"},
        "use_logistic": False,
        "visual_head_idx": [4, 8, 12],
        "text_head_idx": [4, 8, 12],
        "use_t_embed": True,
        "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 8, "dropout": 0.0},
    },
    "training": {
        "mixed_precision": "bf16", "gradient_accumulation_steps": 1, "num_epochs": 1, "uncond_prob": 0.0,
        "learning_rate": 5e-5, "weight_decay": 0.01, "warmup_steps": 1000, "lr_scheduler": "constant",
        "max_grad_norm": 1.0, "t_weighting_scheme": "uniform", "t_weighting_scheme_param": 0.0,
        "use_vae": False, "add_noise": True,
    },
    "data": {"train": {"parquet_files": "/path/part_rank*.parquet", "base_batch_size": 4}},
    "paths": {"run_name": "SD35M-Thurstone-12layers", "save_dir": "outputs"},
    "logging": {"eval_frac": 1000, "save_frac": 2000},
    "system": {"seed": 42},
}


def test_release_config_json_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASE_CONFIG))
    config = load_config(path)
    assert config.model.backbone_mode == "lora"
    assert config.model.lora_config.r == 64 and config.model.lora_config.lora_alpha == 128
    assert config.training.learning_rate == 5e-5
    assert config.system.seed == 42 and config.data.train.base_batch_size == 4
    assert config.paths.run_dir.as_posix() == "outputs/SD35M-Thurstone-12layers"


def test_defaults_are_the_release_configuration():
    model = DiNaConfig().model
    assert (model.num_transformer_layers, model.visual_taps, model.text_taps) == (12, [4, 8, 12], [4, 8, 12])
    assert (model.lora_config.r, model.lora_config.lora_alpha, model.lora_config.init_lora_weights) == (64, 128, "gaussian")
    assert (model.reward_head.num_queries, model.reward_head.num_attn_heads) == (4, 8)
    ours, release = DiNaConfig().to_dict()["model"], DiNaConfig.from_dict(RELEASE_CONFIG).to_dict()["model"]
    assert {**release, "use_ema": False} == ours  # use_ema: the release's key that its trainer never reads


def test_the_release_recipe_is_the_default_and_its_inert_keys_are_named():
    """The authors' trainer builds no LR schedule for lr_scheduler: constant and reads EMA from
    training.use_ema, so the release trained without warmup or EMA: so does our default."""
    default = DiNaConfig()
    assert (default.training.lr_scheduler, default.training.warmup_steps, default.training.use_ema) == ("constant", 0, False)
    assert default.inert_release_keys() == []
    inert = DiNaConfig.from_dict(RELEASE_CONFIG).inert_release_keys()
    assert [key.split(" ")[0] for key in inert] == ["model.use_ema", "training.warmup_steps=1000"]
    chosen = DiNaConfig.from_dict({"training": {"lr_scheduler": "constant_with_warmup", "warmup_steps": 1000, "use_ema": True}})
    assert chosen.inert_release_keys() == []


@pytest.mark.parametrize("name", ["sd35m-thurstone-12layer", "flux-thurstone-19layer", "zimage-thurstone-16layer"])
def test_shipped_configs_train_as_the_release_did(name):
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert config.inert_release_keys() == [] and config.training.lr_scheduler == "constant" and not config.training.use_ema


def test_yaml_round_trip(tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_transformer_layers": 6, "visual_head_idx": [2, 6], "text_head_idx": [6]}}))
    config = load_config(path)
    assert config.model.num_transformer_layers == 6 and config.model.visual_taps == [2, 6]


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"model.num_transformer_layer'.*did you mean 'num_transformer_layers'"):
        DiNaConfig.from_dict({"model": {"num_transformer_layer": 4}})


def test_taps_beyond_kept_layers_are_rejected():
    with pytest.raises(ConfigError, match=r"taps \[14\] beyond the 12 kept layers"):
        DiNaConfig.from_dict({"model": {"visual_head_idx": [4, 8, 14]}})


def test_unknown_loss_and_unsupported_logistic_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not a known loss"):
        DiNaConfig.from_dict({"model": {"model_type": "hinge"}})
    with pytest.raises(ConfigError, match="use_logistic"):
        DiNaConfig.from_dict({"model": {"use_logistic": True}})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load_with_the_release_defaults():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "configs" / "sd35m-thurstone-12layer.yaml")
    assert config.model.backbone == "sd3"  # the release names it; our default leaves it to the transformer's class
    assert dataclasses.replace(config.model, backbone="") == DiNaConfig().model
    assert config.training.learning_rate == DiNaConfig().training.learning_rate


@pytest.mark.parametrize("name,backbone", [("flux-thurstone-19layer", "flux"), ("zimage-thurstone-16layer", "zimage")])
def test_the_authors_yaml_loads_unchanged_and_equals_the_shipped_config(name, backbone):
    from pathlib import Path

    theirs = load_config(Path(__file__).parent / "data" / "authors_configs" / f"{name}.yaml")
    ours = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert [key.split(" ")[0] for key in theirs.inert_release_keys()] == ["model.use_ema", "training.warmup_steps=1000"]
    # equal, once the keys their trainer never reads are left out: the shipped config trains as they trained
    assert ours.model.backbone == backbone and dataclasses.replace(ours.model, backbone="") == dataclasses.replace(theirs.model, use_ema=False)
    assert ours.training == dataclasses.replace(theirs.training, warmup_steps=0) and ours.paths == theirs.paths
    assert dataclasses.replace(ours.data.train, parquet_files="", bucket_file="") == dataclasses.replace(
        theirs.data.train, parquet_files="", bucket_file="", num_workers=0)
