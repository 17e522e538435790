"""The whole pipeline at toy size: `bash run.sh --quick` (conftest's quick_pipeline, run once per test run) runs
the main job's stages and writes the report; a second run reuses every stage's output. Every command of the
other plans (--all, --sweep, --seeds) is parsed by its stage and checked against its RULES without running."""
import importlib
import json
import re
import shlex
import subprocess
import time

import pytest

from common import check_rules
from conftest import ROOT

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rloo")


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
    assert ran == ["pretrain", "prompting", "sft", "world_pairs", "preferences", *STAGES[2:], "report"]
    # the main job only: the sweeps are --sweep's, the comparison runs --all's
    assert not (out / "dpo_beta0.5").exists() and not (out / "dpo_rpo0").exists() and not (out / "sft_lora").exists()

    t0 = time.time()
    r = subprocess.run(["bash", "run.sh", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    assert r.stdout.count("skipped") == len(ran) - 1   # all but the report, which runs from its cache
    assert time.time() - t0 < 120


def plan(*args):
    """run.sh's plan: [(stage, script, argv)] of the commands it would run, nothing run."""
    r = subprocess.run(["bash", "run.sh", *args, "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = []
    for line in r.stdout.splitlines():
        name, command = line.split(": ", 1)
        python, script, *argv = shlex.split(command)
        assert python == "python3" and script.endswith(".py"), line
        rows.append((name, script[:-3], argv))
    return rows


@pytest.mark.parametrize("args", [["--all", "--seeds", "2"], ["--quick"], []], ids=["all", "quick", "main"])
def test_every_planned_command_parses_and_breaks_no_rule(args):
    """What the quick pipeline does not run (the sweeps, --all's studies, more seeds) is at least a valid
    command line of its stage: an option renamed or a rule broken in run.sh fails here, not an hour in."""
    rows = plan(*args)
    assert rows[0][0] == "pretrain" and rows[-1][0] == "report"
    for name, script, argv in rows:
        module = importlib.import_module(script)
        parsed = module.build_parser().parse_args(argv)   # the files it names need not exist yet
        check_rules(parsed, getattr(module, "RULES", []))
        assert not parsed.__dict__.get("resume"), name   # run.sh adds --resume at run time only
