"""The command line of every stage: each numeric option declares its valid range and refuses a value
outside it in one line (walked over every parser, so an option added later is covered), every rule
between options (a stage's RULES) refuses the command line it names in one line, --help shows
the defaults, the output directory is checked and locked before any work, Ctrl-C ends in one line and
exit 130, a stopped run never looks finished, --resume continues the run it names with that run's
options, and files are written with the mode of a plain open()."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import world
from common import RANGED_TYPES, UserError, atomic_save_safetensors, atomic_write, claim_output_dir
from gpt import GPT, GPTConfig, save_checkpoint
from training import MetricsLog, make_optimizer, run_finished, save_train_state
from conftest import run_script, sigint_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every module with a command line (a build_parser function): a stage added later is covered without a new test
CLIS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and
              "\ndef build_parser(" in open(os.path.join(ROOT, f), encoding="utf-8").read())
# numeric options that may take any value, and why
ANY_VALUE = {"--seed": "any integer seeds the random generators", "--world-seed": "any integer makes a world",
             "--guard-threshold": "a reward model's score is any real number"}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256", "--log-interval", "1"]


def test_the_command_lines_are_found():
    assert {"pretrain", "sft", "reward", "dpo", "ppo", "grpo", "sample"} <= set(CLIS)


def parsers():
    for name in CLIS:
        yield name, importlib.import_module(name).build_parser()


def positionals(parser):
    """Placeholder values for a parser's positional arguments."""
    return [a.choices[0] if a.choices else "x" for a in parser._actions
            if not a.option_strings and a.nargs != "?" and a.dest != "help"]


def ranged_options():
    for name, parser in parsers():
        for a in parser._actions:
            if a.type in RANGED_TYPES:
                for bad in a.type.bad_values:
                    yield pytest.param(name, a.option_strings[-1], bad, id=f"{name} {a.option_strings[-1]} {bad}")


@pytest.mark.parametrize("stage, option, bad", list(ranged_options()))
def test_every_ranged_option_refuses_a_value_outside_its_range_in_one_line(stage, option, bad, capsys):
    parser = importlib.import_module(stage).build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*positionals(parser), f"{option}={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {option} must be "), err


def test_no_numeric_option_is_left_without_a_range():
    loose = [f"{name} {a.option_strings[-1]}" for name, parser in parsers() for a in parser._actions
             if a.type in (int, float) and a.option_strings[-1] not in ANY_VALUE]
    assert not loose, f"give these a range type from common.py (or list them in ANY_VALUE with a reason): {loose}"


def cross_option_rules():
    for name in CLIS:
        for k, rule in enumerate(getattr(importlib.import_module(name), "RULES", ())):
            yield pytest.param(name, k, id=f"{name} {' '.join(rule.example)}")


CROSS_OPTION_RULES = list(cross_option_rules())


@pytest.mark.parametrize("stage, k", CROSS_OPTION_RULES)
def test_every_cross_option_rule_refuses_its_example_in_one_line(stage, k):
    """The example of each rule breaks that rule first, and check_args (before any file is read) says so in
    one line naming an option of the example."""
    module = importlib.import_module(stage)
    rule = module.RULES[k]
    args = module.parse_args([*positionals(module.build_parser()), *rule.example])
    with pytest.raises(UserError) as e:
        module.check_args(args)
    msg = str(e.value)
    assert msg == rule.message.format(a=args) and "\n" not in msg and "{" not in msg, msg
    assert any(o in msg for o in rule.example if o.startswith("--")), msg


def test_the_defaults_break_no_rule_and_the_rules_are_counted():
    stages = {name: importlib.import_module(name) for name in CLIS if hasattr(importlib.import_module(name), "RULES")}
    for name, module in stages.items():
        args = module.parse_args(positionals(module.build_parser()))
        assert not [r.message for r in module.RULES if r.broken(args)], name
    counts = {name: len(module.RULES) for name, module in stages.items()}
    print(f"{sum(counts.values())} cross-option rules tried in {len(counts)} stages: {counts}")
    assert {"pretrain", "sft", "reward", "dpo", "ppo", "grpo"} <= set(counts) and sum(counts.values()) == len(CROSS_OPTION_RULES)


def test_a_value_inside_the_range_is_taken_and_converted():
    import pretrain
    args = pretrain.parse_args(["--batch-size", "3", "--val-fraction", "0.25", "--lr", "1e-3", "--min-lr", "0"])
    assert (args.batch_size, args.val_fraction, args.lr, args.min_lr) == (3, 0.25, 1e-3, 0.0)
    assert args.given == {"batch_size", "val_fraction", "lr", "min_lr"}
    assert "given" not in vars(args)  # vars(args) is saved as JSON in config.json


def test_help_shows_every_default():
    for name, parser in parsers():
        parser.format_help()
        formatter = parser._get_formatter()
        for a in parser._actions:
            if a.option_strings and a.default is not None and a.default is not False and a.default != "==SUPPRESS==":
                assert "default" in formatter._get_help_string(a), (name, a.option_strings)
    import reward
    text = reward.build_parser().format_help()
    assert "{'all'" not in text and "50 with --train head" in " ".join(text.split())


def cli(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, **kw)


def assert_one_line(r, code, *needles):
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_an_option_out_of_range_is_one_line_from_the_real_command():
    assert_one_line(cli("pretrain.py", "--batch-size", "0"), 2, "--batch-size must be a positive integer, not 0")


# ----------------------------------------------------------------------------- the output directory

def test_out_naming_a_file_or_an_uncreatable_directory_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_output_dir(str(tmp_path / "f"))
    with pytest.raises(UserError, match="cannot create"):
        claim_output_dir(str(tmp_path / "f" / "sub"))
    assert_one_line(run_script("pretrain.py", "--out", str(tmp_path / "f")), 2, "--out", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_out_in_a_read_only_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot create"):
            claim_output_dir(str(ro / "run"))
    finally:
        ro.chmod(0o755)


def test_the_lock_refuses_a_live_process_and_takes_over_a_dead_ones(tmp_path):
    import socket
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            claim_output_dir(str(out))
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(str(out))  # the holder is gone: its lock is stale
    assert lock.read_text().split()[0] == str(os.getpid())
    claim_output_dir(str(out))  # our own lock, taken again by a second stage in this process


def test_a_second_run_on_the_same_out_is_refused_and_the_lock_goes_at_exit(tmp_path):
    out = str(tmp_path / "run")
    hold = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import common; common.run_cli(lambda: "
            f"(common.claim_output_dir({out!r}), print('locked', flush=True), time.sleep(60)))")
    first = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        r = run_script("pretrain.py", "--out", out)
        assert_one_line(r, 2, f"{out} is in use by process {first.pid}", "another --out")
    finally:
        first.terminate()
        assert first.wait() == 128 + signal.SIGTERM
    assert not os.path.exists(os.path.join(out, ".lock"))  # SIGTERM ends it through atexit


# ----------------------------------------------------------------------------- Ctrl-C and stopping early

def test_ctrl_c_before_the_loop_is_one_line_exit_130_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    # the default world and a 4096-token tokenizer: seconds of work before the training loop starts
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--out", str(out), "--max-iters", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    t0 = time.time()
    while not (out / ".lock").exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    left = sorted(os.listdir(out))
    assert not [f for f in left if f.endswith(".tmp") or f in ("config.json", ".lock")], left


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(world.pretrain_docs(world.make_world(1), size_chars=20_000)))
    return str(path)


def test_a_signal_in_the_loop_saves_the_state_exits_non_zero_and_never_looks_finished(tmp_path, corpus):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--data", corpus, *TINY, "--max-iters", "100000",
                             "--eval-interval", "2", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and not (out / "config.json").exists():  # a mid-run checkpoint at step 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    assert (out / "resume" / "state.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["finished"] is False and not run_finished(str(out))


# ----------------------------------------------------------------------------- --resume

def run_pretrain(*args):
    return run_script("pretrain.py", *args)


def test_resume_takes_the_runs_options_and_refuses_a_changed_one(tmp_path, corpus):
    out = str(tmp_path / "run")
    r = run_pretrain("--data", corpus, *TINY, "--max-iters", "6", "--stop-at", "3", "--out", out)
    assert r.returncode == 0 and "stopped at step 3" in r.stdout, r.stderr
    assert_one_line(run_pretrain("--resume", "--out", out, "--n-layer", "2"), 2, "--n-layer 2 differs", "(1)")
    assert_one_line(run_pretrain("--resume", "--out", out, "--data", "other.txt"), 2, "--data")
    assert_one_line(run_pretrain("--resume", "--out", out, "--max-iters", "2"), 2, "--max-iters 2", "step 3")
    # no --data and no model options: the saved ones, not the default world
    r = run_pretrain("--resume", "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["finished"] is True and cfg["step"] == 6 and cfg["args"]["data"] == [corpus]
    assert cfg["model"]["n_layer"] == 1
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == sorted(steps) and steps[-1] == 6
    # a finished run: said so, exit 0, nothing written; a larger --max-iters continues it
    before = os.path.getmtime(os.path.join(out, "model.safetensors"))
    r = run_pretrain("--resume", "--out", out)
    assert r.returncode == 0 and "finished run" in r.stdout
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == before
    r = run_pretrain("--resume", "--out", out, "--max-iters", "8")
    assert r.returncode == 0 and json.load(open(os.path.join(out, "config.json")))["step"] == 8, r.stderr


def test_eta_after_resume_counts_only_the_steps_run_since(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_train_state(str(tmp_path), model, make_optimizer(model, 1e-3), 50)
    with open(tmp_path / "metrics.jsonl", "w") as f:  # records past the saved step (a crash) are dropped
        f.write("".join(json.dumps({"step": s}) + "\n" for s in (40, 50, 60)))
    log = MetricsLog(str(tmp_path), total=100, resume=True)
    log.t0 = time.time() - 10.0  # 10 s for the 10 steps 50 -> 60: 40 steps left take 40 s
    log.log(60, loss=1.0)
    assert "eta 40s" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [40, 50, 60]


# ----------------------------------------------------------------------------- file modes

def test_checkpoint_and_cache_files_have_the_mode_of_a_plain_open(tmp_path, small_enc):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.json"), "{}")
        atomic_save_safetensors({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
        model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=8, n_layer=1, n_head=1, n_embd=8))
        save_checkpoint(str(tmp_path / "ckpt"), model, small_enc, {"stage": "test"})
        save_train_state(str(tmp_path / "ckpt"), model, make_optimizer(model, 1e-3), 1)
    finally:
        os.umask(old)
    files = [tmp_path / "a.json", tmp_path / "a.safetensors", *(tmp_path / "ckpt").iterdir(),
             tmp_path / "ckpt" / "resume" / "state.safetensors"]
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


# ----------------------------------------------------------------------------- run.sh

def run_sh(*args, **kw):
    return subprocess.run(["bash", "run.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_run_sh_resumes_a_stopped_stage_instead_of_skipping_it(quick_pipeline):
    out, stdout = quick_pipeline   # its pre-training was stopped at step 5 before run.sh started
    first = stdout.split("\n== prompting")[0]
    assert "--resume" in first and "resuming" in first and "skipped" not in first
    cfg = json.load(open(out / "pretrain" / "config.json"))
    assert cfg["finished"] is True and cfg["step"] == 40
    r = run_sh("--quick", "--out", str(out), "--until", "pretrain")
    assert r.returncode == 0 and "skipped" in r.stdout and "stopped after pretrain" in r.stdout  # finished now


def stages_of(*args):
    """The stages a run.sh command would run, from its --plan (nothing runs); its refusal of an unknown
    --until names the same stages."""
    r = run_sh(*args, "--plan")
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    names = [line.split(": ")[0] for line in r.stdout.splitlines()]
    r = run_sh(*args, "--until", "no_such_stage")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("run.sh: unknown stage 'no_such_stage' for --until; the stages of this run: ")
    assert r.stderr.split(": ")[-1].split(" (")[0].split() == names
    return names


def test_run_sh_main_job_sweep_and_all():
    main = stages_of()
    assert main == ["pretrain", "prompting", "sft", "preferences", "reward", "dpo", "ppo", "grpo", "rloo", "report"]
    sweep = stages_of("--sweep")
    assert set(sweep) - set(main) == {*(f"dpo_beta{b}" for b in ("0.05", "0.5", "1", "2", "5")),
                                      *(f"{m}_kl{c}" for m in ("ppo", "grpo", "rloo") for c in ("0.02", "0.05", "0.2", "0.5", "1"))}
    every = stages_of("--all")
    cot = {"cot_pretrain", "cot_rl_prompts", "cot_grpo", "cot_eval_grpo",   # the chain-of-thought block (docs/cot.md)
           *(f"cot_{k}_{t}" for k in ("data", "val", "test") for t in ("cot", "direct")),
           *(f"cot_{k}_{t}_s{s}" for k in ("sft", "eval") for t in ("cot", "direct") for s in (1, 2, 3)),
           *(f"cot_{k}_s{s}" for k in ("sft400", "eval_sft400", "grpo_steps", "eval_grpo_steps") for s in (1, 2, 3))}
    costs = {"judge", *(f"{k}_{x}" for k in ("preferences", "reward", "rloo", "dpo")   # docs/judges.md
                        for x in ("gold", "llm", "bertscore", "rougeL"))}
    hh = {"sft_plain", "sft_plain_replay", "sft_helpful", "hh_prompts", "preferences_hh", "reward_hh", "preferences_helpful_hh",
          *(f"{m}_{f}hh" for m in ("dpo", "ppo", "rloo") for f in ("", "helpful_"))}
    assert set(every) - set(sweep) == {"sft_lora", "sft_qlora", "domain", "domain_sft", "domain_sft_replay", "domain_grpo",
                                       "reward_head", "dpo_rpo0", "dpo_from_base", *cot, *costs, *hh}
    every2 = stages_of("--all", "--seeds", "2")   # the label sources and the combined objective run for every seed
    assert {f"{x}_s2" for x in costs - {"judge"}} <= set(every2) and "judge_s2" not in every2
    assert {f"{m}_{f}hh_s2" for m in ("dpo", "ppo", "rloo") for f in ("", "helpful_")} <= set(every2)
    assert "reward_hh_s2" not in every2
    assert set(sweep) <= set(every) and every[-1] == "report"
    seeds = stages_of("--seeds", "2")
    assert set(seeds) - set(main) == {"dpo_s2", "ppo_s2", "grpo_s2", "rloo_s2"}
    plan = {line.split(": ")[0]: line.split(": ", 1)[1] for line in run_sh("--all", "--plan").stdout.splitlines()}
    # the combined prompts are 43% reviews: twice the rollout and the minibatch, the default's review prompts and steps
    assert plan["rloo_hh"].endswith("--rollout-batch 16 --minibatch 16") and "--rollout-batch" not in plan["rloo"]
    assert plan["ppo_helpful_hh"].endswith("--rollout-batch 64 --minibatch 16") and "--minibatch" not in plan["ppo"]
    toy = {line.split(": ")[0]: line for line in run_sh("--quick", "--all", "--plan").stdout.splitlines()}
    assert "--minibatch" not in toy["ppo_hh"] and "--minibatch" not in toy["rloo_hh"]   # toy rollouts stay toy
    quick = stages_of("--quick")   # the main job at toy size, its pairs written by the world
    assert set(quick) - set(main) == {"world_pairs"} and set(main) <= set(quick)


@pytest.mark.parametrize("args, line", [
    (["--until", "nosuchstage"], "run.sh: unknown stage 'nosuchstage' for --until; the stages of this run: pretrain "),
    (["--until", "dpo_beta0.5"], "(--sweep and --all add more)"),
    (["--out"], "run.sh: --out needs a directory"),
    (["--out", "--quick"], "run.sh: --out needs a directory"),
    (["--quick", "--until"], "run.sh: --until needs a stage name"),
    (["--seeds"], "run.sh: --seeds needs a positive integer"),
    (["--seeds", "0"], "run.sh: --seeds needs a positive integer, not '0'"),
    (["--seeds", "two"], "run.sh: --seeds needs a positive integer, not 'two'"),
    (["--fast"], "run.sh: unknown option --fast (try --help)"),
])
def test_run_sh_refuses_bad_arguments_in_one_line_before_running_anything(tmp_path, args, line):
    r = run_sh("--out", str(tmp_path / "pipe"), *args)
    assert r.returncode == 2 and r.stdout == "" and line in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "pipe").exists()


def test_run_sh_help_is_its_header_and_complete():
    r = run_sh("--help")
    assert r.returncode == 0 and r.stdout.startswith("The pipeline of the guide")
    for option in ("--sweep", "--all", "--seeds N", "--quick", "--plan", "--force", "--out DIR", "--until NAME", "--help"):
        assert f"bash run.sh {option}" in r.stdout, option
    assert "set -euo" not in r.stdout and r.stdout.rstrip().endswith(".")


def test_ctrl_c_stops_run_sh_with_a_way_to_continue(tmp_path):
    out = tmp_path / "pipe"
    # as a terminal does, SIGINT goes to the whole process group: bash and the stage
    proc = subprocess.Popen(["bash", "run.sh", "--quick", "--out", str(out), "--until", "pretrain"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_default)
    t0 = time.time()
    while not (out / "pretrain" / ".lock").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "pretrain stopped (exit 130); continue with: bash run.sh --quick --out" in stderr
    assert "pretrain done" not in stdout and not run_finished(str(out / "pretrain"))
