"""The whole pipeline at toy size: `bash run.sh --quick` runs every stage and writes the report; a
second run reuses every stage's output."""
import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "sft", "sft_lora", "sft_qlora", "domain", "domain_sft", "domain_sft_replay", "domain_grpo",
          "reward", "reward_head", "dpo", "dpo_rpo0", "dpo_beta0.5", "ppo", "ppo_kl0.2", "grpo", "rloo", "dpo_from_base")


def run_quick(out):
    r = subprocess.run(["bash", "run.sh", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    return r.stdout


def test_quick_pipeline_end_to_end_then_reuse(tmp_path):
    out = tmp_path / "out"
    first = run_quick(out)
    for stage in STAGES:
        cfg = json.loads((out / stage / "config.json").read_text())
        assert "metrics" in cfg, stage
    assert (out / "preferences" / "train.jsonl").stat().st_size > 0
    assert json.loads((out / "prompting" / "results.json").read_text())
    report = (out / "report.md").read_text()
    for name in ("pretrain", "sft", "sft_lora", "sft_qlora", "domain_sft", "domain_sft_replay", "domain_grpo", "dpo", "ppo",
                 "grpo", "rloo", "dpo_from_base"):
        assert f"| {name} |" in report, name
    assert "| format | region |" in report
    assert "skipped" not in first

    t0 = time.time()
    second = run_quick(out)
    assert second.count("skipped") == len(STAGES) + 2   # + prompting, preferences
    assert time.time() - t0 < 120   # only the report runs, from its cache
