import json

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from dina_lrm import DiNaLRM
from dina_lrm.cli import main


@pytest.fixture
def setup(pipe, pipeline_dir, tmp_path):
    reward = DiNaLRM(tiny_config(), pipe.transformer).save_pretrained(tmp_path / "reward")
    images = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
        images.append(path)
    return reward, pipeline_dir, images, tmp_path


def test_score_prints_a_table(setup, capsys):
    reward, model, images, _ = setup
    assert main(["score", "--reward", str(reward), "--model", str(model), "--prompt", "a red circle", *map(str, images)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["raw", "normalized"] and len(lines) == 3
    raw, normalized = map(float, lines[1].split()[:2])
    assert normalized == pytest.approx((raw + 10) / 10, abs=1e-4)


def test_score_json_from_pairs_files_matches_direct_call(setup, capsys):
    reward, model, images, tmp = setup
    (tmp / "pairs.csv").write_text("prompt,image\n" + "".join(f"a red circle,{p.name}\n" for p in images))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps({"prompt": "a red circle", "image": p.name}) + "\n" for p in images))
    outputs = []
    for args in (["--pairs", str(tmp / "pairs.csv")], ["--pairs", str(tmp / "pairs.jsonl")],
                 ["--prompt", "a red circle", *map(str, images)]):
        assert main(["score", "--reward", str(reward), "--model", str(model), "--json", *args]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    raws = [[row["raw"] for row in out["scores"]] for out in outputs]
    assert raws[0] == raws[1] == raws[2] and len(raws[0]) == 2


def test_errors_are_reported_not_raised(setup, capsys):
    reward, model, _, tmp = setup
    assert main(["score", "--reward", str(reward), "--model", str(model), "--prompt", "x", str(tmp / "missing.png")]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["score", "--reward", str(tmp / "none"), "--model", str(model), "--prompt", "x", str(tmp / "img0.png")]) == 2
    assert "reward model directory not found" in capsys.readouterr().err
    (tmp / "empty.csv").write_text("prompt,image\n")
    assert main(["score", "--reward", str(reward), "--model", str(model), "--pairs", str(tmp / "empty.csv")]) == 2
    assert "holds no rows" in capsys.readouterr().err



def test_inputs_are_checked_before_any_model_loads(tmp_path, capsys):
    """A missing image or conflicting inputs fail at once: the model paths here do not even exist."""
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text("prompt,image\nx,img.png\n")
    nowhere = ["--reward", str(tmp_path / "no-reward"), "--model", str(tmp_path / "no-model")]
    assert main(["score", *nowhere, "--prompt", "x", str(tmp_path / "gone.png"), str(tmp_path / "gone2.png")]) == 2
    assert "image not found: " in capsys.readouterr().err
    assert main(["score", *nowhere, "--pairs", str(tmp_path / "pairs.csv"), "--prompt", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["score", *nowhere, str(tmp_path / "img.png")]) == 2
    assert "give --prompt and IMAGE paths, or --pairs FILE" in capsys.readouterr().err
    (tmp_path / "ok.png").write_bytes(b"")
    assert main(["score", *nowhere, "--u", "1.5", "--prompt", "x", str(tmp_path / "ok.png")]) == 2
    assert "noise levels must lie in [0, 1], got [1.5]" in capsys.readouterr().err


def test_a_damaged_checkpoint_never_scores(setup, capsys):
    """64 bytes overwritten mid-file: the file is named, nothing prints a score, the exit code says so."""
    reward, model, images, _ = setup
    lora = reward / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
    raw = bytearray(lora.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64
    lora.write_bytes(bytes(raw))
    assert main(["score", "--reward", str(reward), "--model", str(model), "--prompt", "x", *map(str, images)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.splitlines()[-1].endswith("adapter_model.safetensors is damaged: its SHA-256 differs from manifest.json")


def test_a_non_finite_score_is_an_error_not_a_number(setup, capsys, monkeypatch):
    from dina_lrm.scorer import NonFiniteScoreError, Scorer

    reward, model, images, _ = setup
    scorer = Scorer.from_pretrained(reward, model)
    with torch.no_grad():
        next(scorer.model.reward_head.parameters()).fill_(float("inf"))  # weights broken after the load-time check
    with pytest.raises(NonFiniteScoreError, match=r"NaN or inf for item\(s\) \[0, 1\] of 2"):
        scorer.score("a red circle", images=list(map(str, images)))
    assert not torch.isfinite(scorer.score("a red circle", images=list(map(str, images)), allow_nonfinite=True).raw).any()
    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(lambda cls, *a, **k: scorer))
    assert main(["score", "--reward", str(reward), "--model", str(model), "--prompt", "x", *map(str, images)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "returned NaN or inf" in captured.err


def test_a_library_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only the user's errors become one line; a TypeError inside the library is not blamed on the user."""
    import dina_lrm.cli as cli

    def broken(args):
        raise TypeError("forward_ensemble() got an unexpected keyword argument 'max_batch_items'")

    monkeypatch.setattr(cli, "run_score", broken)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        main(["score", "--prompt", "x", str(tmp_path / "a.png")])


def test_noise_levels_are_one_comma_separated_value(tmp_path):
    from dina_lrm.cli import build_parser

    args = build_parser().parse_args(["score", "--reward", "r", "--model", "m", "--prompt", "x", "--noise-levels", "0.2,0.5", "a.png"])
    assert args.noise_levels == [0.2, 0.5] and args.images == ["a.png"]


def test_zero_valued_flags_are_kept_and_flags_override_the_config_file_then_set_overrides_both(tmp_path):
    from dina_lrm.cli import build_parser
    from dina_lrm.config import load_settings
    from dina_lrm.serve.config import ServeConfig

    (tmp_path / "serve.yaml").write_text("reward: r\nmodel: m\nport: 9000\nmax_batch_size: 4\nmax_prompts: 7\n")
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.yaml"), "--port", "0", "--max-wait-ms", "0",
                                      "--default-u", "0", "--max-batch-size", "2", "--set", "max_batch_size=3"])
    config = load_settings(ServeConfig, args.config, vars(args), args.set)
    assert (config.port, config.max_wait_ms, config.default_u) == (0, 0.0, 0.0)
    assert (config.reward, config.max_prompts, config.max_batch_size) == ("r", 7, 3)


def _declared_settings(cls, prefix="", defaults=None):
    """(dotted key, field, default) of every field declared with ``setting``, nested sections included."""
    import dataclasses

    defaults = cls() if defaults is None else defaults
    for item in dataclasses.fields(cls):
        value = getattr(defaults, item.name)
        if "help" in item.metadata:
            yield prefix + item.name, item, value
        elif dataclasses.is_dataclass(value):
            yield from _declared_settings(type(value), f"{prefix}{item.name}.", value)


def test_every_setting_is_declared_once_and_the_cli_is_generated_from_it():
    """Each declared field of every command's config has exactly one flag, whose help states the
    field's own default: there is no second place where a default could drift."""
    import argparse

    from dina_lrm.cli import build_parser
    from dina_lrm.config import DiNaConfig
    from dina_lrm.data.config import PrepareConfig
    from dina_lrm.eval.config import EvalConfig
    from dina_lrm.search_config import SearchConfig
    from dina_lrm.serve.config import ServeConfig
    from dina_lrm_toyworld.config import AblationConfig, DemoConfig, PretrainConfig, ToyAlignmentConfig

    def subcommands(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    commands = subcommands(build_parser())
    toyworld = subcommands(commands["toyworld"])
    for parser, cls in ((commands["eval"], EvalConfig), (commands["serve"], ServeConfig), (commands["prepare"], PrepareConfig),
                        (commands["train"], DiNaConfig), (commands["sample"], SearchConfig), (commands["demo"], DemoConfig),
                        (toyworld["align"], ToyAlignmentConfig), (toyworld["ablations"], AblationConfig),
                        (toyworld["pretrain"], PretrainConfig)):
        actions = {a.dest: a for a in parser._actions}
        declared = list(_declared_settings(cls))
        assert len(declared) >= 5, cls
        for key, item, default in declared:
            action = actions[key]
            assert action.default is None and item.metadata["help"] in action.help, (cls.__name__, key)
            if isinstance(default, (int, float)) and not isinstance(default, bool) and "default" not in item.metadata["help"]:
                assert f"(default: {default})" in action.help, (cls.__name__, key, action.help)
    assert "(default: 300)" in {a.dest: a for a in toyworld["align"]._actions}["data.train_prompts"].help  # the run's own data default
    eval_args = build_parser().parse_args(["eval", "--levels", "0.2,0.6", "0.3,0.5", "--extra-reward", "a:b", "--extra-reward", "c:d",
                                           "--resamples", "10", "--u", "0.3"])
    assert (eval_args.level_sets, eval_args.extra_rewards, eval_args.bootstrap_resamples, eval_args.u_values) == (
        [[0.2, 0.6], [0.3, 0.5]], ["a:b", "c:d"], 10, [0.3])
    assert build_parser().parse_args(["prepare", "--hard-labels"]).soft_labels is False
    assert build_parser().parse_args(["sample", "--out", "x", "--at", "0.7,0.2"]).at == [0.7, 0.2]


def test_train_flags_are_the_yaml_keys_and_sit_between_the_file_and_set(tmp_path):
    from dina_lrm.cli import build_parser
    from dina_lrm.config import DiNaConfig, load_settings

    path = tmp_path / "train.yaml"
    path.write_text("training:\n  learning_rate: 0.002\n  max_steps: 7\nmodel:\n  num_transformer_layers: 3\n"
                    "  visual_head_idx: [1, 2, 3]\n  text_head_idx: [1, 2, 3]\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--training.max_steps", "9", "--no-model.use_lora",
                                      "--model.visual_head_idx", "2", "3", "--data.train.parquet_files", "a", "b",
                                      "--set", "training.max_steps=11"])
    config = load_settings(DiNaConfig, args.config, vars(args), args.set)
    assert config.training.learning_rate == 0.002 and config.training.max_steps == 11  # file < flags < --set
    assert config.model.use_lora is False and config.model.visual_head_idx == [2, 3] and config.data.train.parquet_files == ["a", "b"]
    assert config.model.num_transformer_layers == 3 and config.model.lora_config.r == 64


def test_version_and_help_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from dina_lrm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    version = subprocess.run([sys.executable, "-m", "dina_lrm", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "dina-lrm 0.1.0"


def test_the_public_api_is_importable_from_the_top_level_without_loading_torch_first():
    import subprocess
    import sys

    import dina_lrm

    code = "import sys, dina_lrm; print('torch' in sys.modules, len(dina_lrm.__all__))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[0] == "False"
    for name in dina_lrm.__all__:
        value = getattr(dina_lrm, name)
        assert getattr(value, "__name__", name) == name or name.isupper(), name
    assert {"Scorer", "Searcher", "Aligner", "AlignConfig", "evaluate", "EvalConfig", "ServeConfig", "flow_grpo_reward",
            "flow_grpo_latent_reward", "NonFiniteScoreError", "load_pipeline", "Trainer"} <= set(dir(dina_lrm))
    with pytest.raises(AttributeError, match="has no attribute 'Scorr'"):
        dina_lrm.Scorr


def test_serve_takes_verl_omnis_flag_names():
    from dina_lrm.cli import build_parser
    from dina_lrm.config import load_settings
    from dina_lrm.serve.config import ServeConfig

    args = build_parser().parse_args(["serve", "--model-path", "rm_dir", "--base-model-path", "sd35"])
    config = load_settings(ServeConfig, None, vars(args))
    assert (config.reward, config.model) == ("rm_dir", "sd35")


@pytest.mark.slow  # a fresh interpreter with the extras blocked; the install layout rarely changes
def test_the_core_install_scores_and_serves_without_the_extras(reward_dir, pipeline_dir):
    """The core dependencies suffice to score and serve: pyarrow, matplotlib and tensorboard (the
    train/eval extras) are blocked from importing here, and scoring still works."""
    import subprocess
    import sys

    code = f"""
import sys
for name in ("pyarrow", "matplotlib", "tensorboard"):
    sys.modules[name] = None
import torch
from dina_lrm import Scorer
from dina_lrm.serve.server import RewardService, ServeConfig
scorer = Scorer.from_pretrained({str(reward_dir)!r}, {str(pipeline_dir)!r})
RewardService(scorer, ServeConfig(reward="r", model="m")).close()
print(scorer.score("a red circle", latents=torch.zeros(1, 4, 8, 8), u=0.4, seed=0).raw.shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("torch.Size([1])")


def test_pairs_paths_start_at_images_root(setup, capsys):
    reward, model, images, tmp = setup
    (tmp / "lists").mkdir()
    (tmp / "lists" / "pairs.csv").write_text("prompt,image\n" + "".join(f"a red circle,{p.name}\n" for p in images))
    base = ["score", "--reward", str(reward), "--model", str(model), "--json", "--pairs", str(tmp / "lists" / "pairs.csv")]
    assert main(base) == 2
    assert "image not found: " + str(tmp / "lists" / "img0.png") in capsys.readouterr().err
    assert main([*base, "--images-root", str(tmp)]) == 0
    assert [row["image"] for row in json.loads(capsys.readouterr().out)["scores"]] == [str(p.resolve()) for p in images]


def test_toy_scoring_works_out_of_the_box_and_equals_the_api():
    """`dina-lrm score --toy` on the shipped examples: the shipped reward on the shipped generator."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from dina_lrm import Scorer
    from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD

    examples = sorted(str(p) for p in (Path(SHIPPED_REWARD).parent / "examples").glob("*.png"))
    assert len(examples) == 2
    result = subprocess.run([sys.executable, "-m", "dina_lrm", "score", "--toy", "--u", "0.4", "--json", "--prompt", "two red circles", *examples],
                            capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision" not in result.stderr  # transformers' notice is silenced
    raw = [row["raw"] for row in json.loads(result.stdout)["scores"]]
    expected = Scorer.from_pretrained(SHIPPED_REWARD, SHIPPED_GENERATOR).score(["two red circles"] * 2, images=examples, u=0.4, seed=0).raw
    torch.testing.assert_close(torch.tensor(raw), expected, atol=1e-5, rtol=0)
    assert main(["score", "--toy", "--reward", "x", "--prompt", "p", examples[0]]) == 2
