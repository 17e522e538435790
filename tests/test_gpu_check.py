"""gpu_check.py: the whole check at toy size on CPU (the "device" is the CPU too), its tolerance rule
by hand, a crashed and a failing stage, and the tolerance against what bf16 really does to a loss."""
import importlib
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import bench
import common
import gpu_check
from common import check_rules
from gpt import GPT, GPTConfig, cross_entropy_loss
from gpu_check import (Budget, check_sampled, check_stage, compare_losses, compile_gain, finish_logged, markdown,
                       start_logged, within_tolerance)
from training import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# the end-to-end check runs these; the others' commands are parsed (below) and their stages tested in-process
E2E_STAGES = ("pretrain", "sft", "sft_qlora", "reward", "ppo")


@pytest.mark.parametrize("plan", list(gpu_check.PLANS))
def test_every_stage_command_of_the_check_parses_and_breaks_no_rule(plan, tmp_path):
    specs = gpu_check.stage_specs(gpu_check.PLANS[plan], str(tmp_path), gpu_check.STAGES)
    assert [name for name, _, _ in specs] == list(gpu_check.STAGES)
    for name, argv, _ in specs:
        cmd = gpu_check.stage_command(argv, "cpu", str(tmp_path / name))[1:]
        module = importlib.import_module(cmd[0].removesuffix(".py"))
        check_rules(module.build_parser().parse_args(cmd[1:]), getattr(module, "RULES", []))


def test_tiny_check_on_cpu_end_to_end(tmp_path):
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--tiny", "--work", str(work),
                        "--stages", ",".join(E2E_STAGES)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    report = json.loads((work / "gpu_check.json").read_text())
    stages = {e["stage"]: e for e in report["stages"]}
    assert list(stages) == list(E2E_STAGES)
    for name in ("pretrain", "sft", "sft_qlora", "reward"):
        e = stages[name]
        assert e["status"] == "pass", (name, e.get("why"))
        assert len(e["cpu_losses"]) == gpu_check.N_LOSSES
        # the same command on the same device in float32 is deterministic: identical losses
        assert e["device_losses"] == e["cpu_losses"], name
        # both runs started from the same reference checkpoint
        assert "--init " + str(work / "reference") in e["device"]["cmd"] or name == "pretrain"
    assert stages["ppo"]["status"] == "pass" and stages["ppo"]["compared"] == "sampled"
    assert stages["ppo"]["first_kl"] == pytest.approx(0.0, abs=1e-6)   # policy = reference at iteration 1
    bench = report["bench"]
    assert "skipped" in bench["compile"] and bench["compile_gain"] is None     # no torch.compile on CPU
    s = bench["eager"]["summary"]
    assert bench["eager"]["rc"] == 0 and s["tokens_per_s"] > 0 and s["mfu"] is None   # no peak FLOP/s on CPU
    assert [(x["batch"], x["new_tokens"]) for x in s["sampling"]] == [(1, 8), (2, 8)]
    assert all(x["identical"] for x in s["sampling"])                  # KV cache = recompute in float32
    table = (work / "gpu_check.md").read_text()
    for name in E2E_STAGES:
        assert f"| {name} | pass |" in table
    assert "| eager | ok |" in table and "| compile | skipped |" in table
    assert table in r.stdout


def test_tolerance_rule_by_hand():
    assert within_tolerance(6.05, 6.0)              # 0.05 <= 0.005 + 0.06
    assert not within_tolerance(6.07, 6.0)          # 0.07 >  0.065
    assert within_tolerance(0.004, 0.0)             # near zero the absolute part counts
    assert not within_tolerance(float("nan"), 1.0) and not within_tolerance(float("inf"), float("inf"))
    ok = compare_losses([6.24, 6.10, 5.90, 99.0], [6.24, 6.12, 5.88, 1.0])   # only the first 3 count
    assert ok["passed"] and ok["max_abs_diff"] == pytest.approx(0.02)
    assert ok["max_rel_diff"] == pytest.approx(0.02 / 5.88)
    bad = compare_losses([6.24, 6.40, 5.90], [6.24, 6.12, 5.88])
    assert not bad["passed"] and bad["why"].startswith("step 2:")
    short = compare_losses([6.24], [6.24, 6.12, 5.88])
    assert not short["passed"] and "fewer than 3" in short["why"]
    assert compile_gain(300.0, 200.0) == 1.5 and compile_gain(None, 200.0) is None


def test_sampled_stage_check():
    assert check_sampled([{"step": 1, "kl": 0.0, "pg_loss": -0.01}, {"step": 2, "kl": 0.4}])["passed"]
    far = check_sampled([{"step": 1, "kl": 0.3, "pg_loss": -0.01}])
    assert not far["passed"] and "KL" in far["why"]
    nan = check_sampled([{"step": 1, "kl": 0.0}, {"step": 2, "vf_loss": float("nan")}])
    assert not nan["passed"] and "vf_loss at step 2" in nan["why"]
    assert not check_sampled([])["passed"]


def fake_args(tmp_path, device="fake"):
    return SimpleNamespace(work=str(tmp_path), device=device, skip_bench=True, bench_reserve=0)


PLAN = {"timeout_reference": 60, "timeout_device": 60}
# a stand-in for a stage: writes OUT/metrics.jsonl with losses that depend on --device
FAKE_STAGE = ("import json, os, sys; a = sys.argv; out = a[a.index('--out') + 1]; os.makedirs(out, exist_ok=True); "
              "d = a[a.index('--device') + 1]; f = open(os.path.join(out, 'metrics.jsonl'), 'w'); "
              "[f.write(json.dumps({'step': s, 'loss': 2.0 + (0.1 * s if d != 'cpu' else 0)}) + chr(10)) "
              "for s in (1, 2, 3)]")


def test_a_stage_whose_losses_differ_fails_with_the_step(tmp_path):
    e = check_stage("sft", ["-c", FAKE_STAGE], (), fake_args(tmp_path), PLAN, Budget(120), {})
    assert e["status"] == "fail" and e["cpu_losses"] == [2.0, 2.0, 2.0]
    assert e["device_losses"] == pytest.approx([2.1, 2.2, 2.3])
    assert e["why"].startswith("step 1: device 2.1 vs cpu 2")
    assert "| sft | fail |" in markdown(report_of([e]))


def report_of(stages):
    return {"machine": {"device": "fake", "date_utc": "2026-01-01 00:00", "torch": torch.__version__},
            "plan": "tiny", "seconds": 1.0, "budget_s": 480, "stages": stages}


def test_a_crashing_stage_is_reported_with_its_stderr_and_what_needs_it_is_skipped(tmp_path):
    crash = ["-c", "import sys; print('Traceback: kernel not found', file=sys.stderr); sys.exit(3)"]
    e = check_stage("pretrain", crash, (), fake_args(tmp_path, "cpu"), PLAN, Budget(120), {})
    assert e["status"] == "crash" and e["reference"]["rc"] == 3
    assert "kernel not found" in e["reference"]["stderr_tail"]
    after = check_stage("sft", ["-c", FAKE_STAGE], ("pretrain",), fake_args(tmp_path), PLAN, Budget(120),
                        {"pretrain": e})
    assert after["status"] == "skipped" and "pretrain" in after["why"]
    table = markdown(report_of([e, after]))
    assert "| pretrain | crash |" in table and "| sft | skipped |" in table


def test_a_run_past_its_timeout_is_killed(tmp_path):
    t0 = time.time()
    run = finish_logged(start_logged([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path)), 1)
    assert run["timed_out"] and run["rc"] != 0 and time.time() - t0 < 30
    assert Budget(100).allow(30) == 30 and Budget(10).allow(30, reserve=5) <= 5


def test_bf16_autocast_moves_three_training_steps_far_less_than_the_tolerance():
    """What bf16 does to a loss, measured on CPU: three AdamW steps of a small GPT from the same weights and
    batches, float32 vs bf16 autocast. The check's tolerance must sit well above this."""
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 65), generator=g) for _ in range(3)]
    result = {}
    for name, autocast in (("fp32", torch.autocast("cpu", enabled=False)),
                           ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = make_optimizer(model, 1e-2)
        result[name] = []
        for b in batches:
            with autocast:
                loss = cross_entropy_loss(model(b[:, :-1]), b[:, 1:].contiguous())
            loss.backward()
            opt.step()
            opt.zero_grad()
            result[name].append(loss.item())
    rel = [abs(a - b) / b for a, b in zip(result["bf16"], result["fp32"])]
    assert max(rel) > 0                          # bf16 really ran
    assert max(rel) < gpu_check.RTOL / 5, (result, rel)
    assert compare_losses(result["bf16"], result["fp32"])["passed"]


def test_the_gpu_plan_parses_in_every_stage_and_in_bench(tmp_path):
    """The small (GPU) plan's command lines are accepted by each stage's own parse_args and by bench.py's,
    so a GPU run does not stop at a typo."""
    plan = gpu_check.PLANS["small"]
    for name, argv, _ in gpu_check.stage_specs(plan, str(tmp_path), gpu_check.STAGES):
        script = argv[0].removesuffix(".py")
        if name == "grpo" and not os.path.exists(os.path.join(ROOT, "grpo.py")):
            continue
        cmd = gpu_check.stage_command(argv, "cuda", str(tmp_path / name))
        module = importlib.import_module(script)
        args = module.parse_args(cmd[2:])
        assert args.device == "cuda" and args.log_interval == 1 and args.out == str(tmp_path / name) and args.force
        common.check_rules(args, module.RULES)   # nor at a rule between its options
    b = bench.parse_args([*plan["bench"].split(), "--device", "cuda", "--compile", "--json", str(tmp_path / "b.json")])
    assert (b.n_layer, b.n_embd, b.block_size, b.vocab_size, b.compile) == (12, 768, 1024, 50257, True)
