"""The whole pipeline at toy size: `bash run.sh --quick` (conftest's quick_pipeline, run once per test run) runs
every stage and writes the report; a second run reuses every stage's output."""
import json
import re
import subprocess
import time

from conftest import ROOT

STAGES = ("pretrain", "sft", "sft_lora", "sft_qlora", "domain", "domain_sft_replay", "domain_grpo", "reward", "dpo",
          "ppo", "grpo", "rloo")


def test_quick_pipeline_end_to_end_then_reuse(quick_pipeline):
    out, first = quick_pipeline
    for stage in STAGES:
        cfg = json.loads((out / stage / "config.json").read_text())
        assert "metrics" in cfg and cfg.get("finished") is not False, stage   # run.sh's test of a finished stage
    assert (out / "preferences" / "train.jsonl").stat().st_size > 0
    assert json.loads((out / "prompting" / "results.json").read_text())
    report = (out / "report.md").read_text()
    for name in STAGES:
        if name != "reward":
            assert f"| {name} |" in report, name
    assert "| reward |" in report   # the reward models' table
    assert "| format | region |" in report
    assert "skipped" not in first
    ran = re.findall(r"^== (\S+) done in \d+ s$", first, re.M)
    assert ran == ["pretrain", "prompting", *STAGES[1:7], "world_pairs", "preferences", *STAGES[7:], "report"]
    # the main job only: the sweeps are --sweep's, the comparison runs --all's
    assert not (out / "dpo_beta0.5").exists() and not (out / "dpo_rpo0").exists() and not (out / "domain_sft").exists()

    t0 = time.time()
    r = subprocess.run(["bash", "run.sh", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    assert r.stdout.count("skipped") == len(ran) - 1   # all but the report, which runs from its cache
    assert time.time() - t0 < 120
