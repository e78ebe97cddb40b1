import json

from dina_lrm.toyworld.demo import make_pairs, run_demo


def test_demo_pairs_differ_only_by_a_defect():
    prompt, clean, defect = make_pairs(1, seed=0)[0]
    assert prompt.startswith("a ") and prompt.endswith(" square")
    assert clean.shape == defect.shape == (64, 64, 3) and (clean != defect).any()


def test_tiny_demo_run_writes_report_and_reloadable_checkpoint(tmp_path):
    summary = run_demo(tmp_path, steps=3, num_train=16, num_eval=8)
    assert set(summary["after"]) == {"u=0.1", "u=0.4", "u=0.7", "ensemble 0.1+0.4+0.7"}
    assert all(0.0 <= v <= 1.0 for v in summary["after"].values())
    assert (tmp_path / "report.md").read_text().count("|") > 20
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert (tmp_path / "reward" / "checkpoint" / "backbone_lora" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] > 0
