"""Every stage checks its command line before any work (issue table of docs/reliability.md): each case below is
one line naming the option or the path, exit 2, and nothing written or lost. The model is saved before the
final evaluation, so a failing evaluation leaves a loadable model that --resume evaluates again; a closed
stdout or stderr never stops a run."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dpo
import gpt
import grpo
import ppo
import preferences
import pretrain
import reward
import sample
import sft
from common import UserError, atomic_save_safetensors, check_device
from conftest import run_script
from gpt import GPT, GPTConfig, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256", "--log-interval", "1", "--threads", "1"]
GOOD = {"instruction": "Say red.", "input": "", "output": "red"}
PAIR = {"prompt": "Instruction: Say a colour.\nOutput:", "chosen": " red", "rejected": " blue"}


def cli(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, **kw)


def assert_one_line(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


def refused(main, argv, *needles):
    """main(argv) stops with a UserError (run_cli: one line, exit 2) whose message holds every needle."""
    with pytest.raises(UserError) as e:
        main(argv)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, small_enc, small_text):
    """A policy with context 32, one with context 128, a reward model, a corpus and instruction/pair files."""
    d = tmp_path_factory.mktemp("preflight")
    torch.manual_seed(0)
    for name, block in (("base", 32), ("wide", 128)):
        model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=block, n_layer=1, n_head=2, n_embd=32))
        save_checkpoint(str(d / name), model, small_enc, {"stage": "sft"})
    rm = reward.RewardModel(GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                                          n_embd=32)))
    save_checkpoint(str(d / "rm"), rm.trunk, small_enc, {"stage": "reward"})
    atomic_save_safetensors(reward.head_state(rm), str(d / "rm" / reward.HEAD_FILE))
    (d / "corpus.txt").write_text(small_text)
    (d / "jsonl").mkdir()
    (d / "jsonl" / "train.jsonl").write_text("".join(json.dumps(GOOD) + "\n" for _ in range(8)))
    (d / "jsonl" / "pairs.jsonl").write_text("".join(json.dumps(PAIR) + "\n" for _ in range(8)))
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": PAIR["prompt"]}) + "\n")
    return d


# ----------------------------------------------------------------------------- device, model shape, context

@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu"])
def test_a_device_this_torch_lacks_is_one_line_before_any_work(device, tmp_path, ckpts):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this machine has that GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    for main, argv in ((pretrain.main, []), (sft.main, ["--init", str(ckpts / "wide")]),
                       (dpo.main, ["--init", str(ckpts / "wide"), "--data", "world"]),
                       (reward.main, ["--init", str(ckpts / "wide")])):
        refused(main, [*argv, "--device", device, "--out", str(tmp_path / "o")], f"--device {device}")
        assert not (tmp_path / "o").exists()
    assert check_device("cpu") == "cpu"


def test_the_device_line_from_the_real_command():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line(cli("pretrain.py", "--device", "cuda"), "--device cuda", "--device cpu")


@pytest.mark.parametrize("argv, needle", [
    (["--n-head", "3", "--n-embd", "64"], "--n-embd 64 must be divisible by --n-head 3"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be divisible by --n-head 4"),
    (["--eval-tokens", "10"], "--eval-tokens 10 must be at least --block-size 256"),
    (["--preset", "gpt2", "--n-layer", "2"], "--n-layer has no effect with --preset gpt2"),
])
def test_pretrain_shape_and_sizes_are_refused_when_parsed(argv, needle):
    assert_one_line(run_script("pretrain.py", *argv), needle)


def test_a_context_too_short_for_the_evaluation_prompts_is_refused_before_the_corpus_is_tokenized(tmp_path):
    out = tmp_path / "o"
    refused(pretrain.main, ["--block-size", "8", "--vocab-size", "300", "--recall-limit", "20", "--threads", "1",
                            "--out", str(out)], "--block-size 8", "or --recall-limit 0")
    assert not [f for f in os.listdir(out) if not f.startswith(".")]   # no token cache, no model


def test_block_size_follows_init_and_a_longer_one_is_refused(tmp_path, ckpts):
    base = str(ckpts / "base")
    refused(pretrain.main, ["--init", base, "--block-size", "64", "--out", str(tmp_path / "a")],
            "--block-size 64", "--block-size 32 or less")
    args = pretrain.parse_args(["--init", base, "--data", str(ckpts / "corpus.txt"), "--out", str(tmp_path / "b")])
    pretrain.check_args(args)
    assert args.block_size == 32
    m = pretrain.main(["--init", base, "--data", str(ckpts / "corpus.txt"), "--max-iters", "2", "--batch-size", "2",
                       "--eval-tokens", "64", "--threads", "1", "--out", str(tmp_path / "b")])
    assert json.load(open(tmp_path / "b" / "config.json"))["args"]["block_size"] == 32 and "val_loss" in m


def test_sft_windows_and_options_without_effect(tmp_path, ckpts):
    wide = str(ckpts / "wide")
    refused(sft.main, ["--init", wide, "--mode", "domain", "--block-size", "100000", "--out", str(tmp_path / "o")],
            "--block-size 100000 is longer than the context", "(128)")
    refused(sft.main, ["--init", wide, "--block-size", "8", "--out", str(tmp_path / "o")],
            "--block-size has no effect in --mode instruct")
    refused(sft.main, ["--init", wide, "--lora", "64", "--out", str(tmp_path / "o")], "--lora 64", "width 32")
    assert not (tmp_path / "o").exists()


def test_evaluation_prompts_longer_than_the_context_are_refused_before_any_step(tmp_path, ckpts):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 40}) + "\n")
    refused(dpo.main, ["--init", str(ckpts / "base"), "--data", str(ckpts / "jsonl" / "pairs.jsonl"),
                       "--eval-prompts", str(long), "--threads", "1", "--out", str(tmp_path / "o")],
            "--eval-prompts: a prompt of", "context of 32")
    assert not (tmp_path / "o" / "config.json").exists()


# ----------------------------------------------------------------------------- checkpoints and paths

@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "preferences"])
def test_a_reward_model_is_not_a_policy(stage, tmp_path, ckpts):
    main = {"pretrain": pretrain.main, "sft": sft.main, "dpo": dpo.main, "preferences": preferences.main}[stage]
    extra = ["--data", "world"] if stage == "dpo" else []
    refused(main, ["--init", str(ckpts / "rm"), *extra, "--out", str(tmp_path / "o")], "is a reward model")
    if stage == "dpo":
        refused(main, ["--init", str(ckpts / "wide"), "--ref", str(ckpts / "rm"), *extra, "--out",
                       str(tmp_path / "o")], "--ref", "is a reward model")


def test_out_equal_to_init_is_refused_and_the_input_untouched(tmp_path, ckpts, small_enc):
    src = tmp_path / "sft"
    save_checkpoint(str(src), GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=128, n_layer=1, n_head=2,
                                            n_embd=32)), small_enc, {"stage": "sft"})
    before = {f: os.path.getmtime(src / f) for f in os.listdir(src)}
    refused(sft.main, ["--init", str(src), "--out", str(src)], f"--out {src} is the --init directory")
    refused(dpo.main, ["--init", str(ckpts / "wide"), "--ref", str(src), "--data", "world", "--out", str(src)],
            "is the --ref directory")
    refused(reward.main, ["--init", str(src), "--out", str(src) + "/"], "is the --init directory")
    assert {f: os.path.getmtime(src / f) for f in os.listdir(src)} == before


def test_a_directory_where_files_are_expected_names_the_files(tmp_path, ckpts):
    d = str(ckpts / "jsonl")
    wide = str(ckpts / "wide")
    refused(sft.main, ["--init", wide, "--data", d, "--out", str(tmp_path / "o")], f"--data {d} is a directory",
            "train.jsonl")
    refused(dpo.main, ["--init", wide, "--data", d, "--out", str(tmp_path / "o")], f"--data {d} is a directory")
    refused(reward.main, ["--init", wide, "--data", d, "--out", str(tmp_path / "o")], f"--data {d} is a directory")
    refused(pretrain.main, ["--data", d, "--out", str(tmp_path / "o")], f"--data {d} is a directory")


def test_the_rl_stages_answer_the_issue_rows_in_one_line(ckpts):
    d = str(ckpts / "jsonl")
    assert_one_line(run_script("ppo.py", "--prompts", d), f"--prompts {d} is a directory", "pairs.jsonl")
    assert_one_line(run_script("grpo.py", "--reward", "out/reward", "--task", "facts"),
                    "--task has no effect without --reward exact")


@pytest.mark.parametrize("stage", [ppo, grpo], ids=["ppo", "grpo"])
def test_the_rl_stages_check_their_checkpoints_and_paths_before_any_work(stage, tmp_path, ckpts):
    wide, rm, out = str(ckpts / "wide"), str(ckpts / "rm"), str(tmp_path / "o")
    run = ["--reward", rm, "--threads", "1", "--out", out]
    refused(stage.main, ["--init", rm, *run], "--init", "is a reward model")
    refused(stage.main, ["--init", wide, "--ref", rm, *run], "--ref", "is a reward model")
    refused(stage.main, ["--init", wide, "--reward", wide, "--out", out], f"--reward {wide} is a 'sft' checkpoint")
    refused(stage.main, ["--init", wide, "--reward", str(tmp_path / "none"), "--out", out], "no checkpoint at",
            "python reward.py")
    refused(stage.main, ["--init", wide, "--reward", rm, "--out", rm], f"--out {rm} is the --reward directory")
    refused(stage.main, ["--init", wide, *run, "--eval-prompts", str(ckpts / "jsonl")], "--eval-prompts", "directory")
    assert not os.path.exists(out)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 40}) + "\n")
    refused(stage.main, ["--init", str(ckpts / "base"), "--reward", "gold", "--prompts", str(ckpts / "prompts.jsonl"),
                         "--eval-prompts", str(long), "--threads", "1", "--out", out],
            "--eval-prompts: a prompt of", "context of 32")
    assert not os.path.exists(os.path.join(out, "config.json")) and not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_sample_refuses_an_empty_prompt_a_file_and_a_directory_of_checkpoints(ckpts):
    assert_one_line(run_script("sample.py", str(ckpts / "wide"), ""), "the prompt is empty")
    assert_one_line(run_script("sample.py", str(ckpts / "wide" / "model.safetensors"), "Hi"), "is a file",
                    f"({ckpts / 'wide'})")
    assert_one_line(run_script("sample.py", str(ckpts), "Hi"), "is not a checkpoint but holds", str(ckpts / "base"))


def test_export_then_import_keeps_the_stage(tmp_path, ckpts):
    gpt.main(["export", str(ckpts / "wide"), str(tmp_path / "hf")])
    assert json.load(open(tmp_path / "hf" / "config.json"))[gpt.PIPELINE_STAGE] == "sft"
    gpt.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])
    config = json.load(open(tmp_path / "back" / "config.json"))
    assert config["stage"] == "sft" and sample.use_template(config) == (True, "stage sft")


@pytest.mark.parametrize("script", ["tokenizer.py", "quant4.py"])
def test_help_is_help(script):
    r = run_script(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "trained" not in r.stdout.split("\n")[0], r.stdout


# ----------------------------------------------------------------------------- a stopped run, a closed stdout

def test_a_fresh_run_on_a_stopped_run_is_refused_and_force_discards_it(tmp_path, ckpts):
    out = str(tmp_path / "run")
    argv = ["--data", str(ckpts / "corpus.txt"), *TINY, "--max-iters", "4", "--out", out]
    pretrain.main([*argv, "--stop-at", "2"])
    state = os.path.join(out, "resume", "state.safetensors")
    mtime = os.path.getmtime(state)
    refused(pretrain.main, argv, "stopped at step 2", "--resume", "--force")
    assert os.path.getmtime(state) == mtime
    assert pretrain.main([*argv, "--force"])["val_loss"] > 0
    assert json.load(open(os.path.join(out, "config.json")))["finished"] is True


def test_a_closed_stdout_and_stderr_never_stop_the_run(tmp_path, ckpts):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--data", str(ckpts / "corpus.txt"), *TINY,
                             "--max-iters", "30", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("corpus:")   # `| head -1`: the reader goes after one line
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=240) == 0
    assert json.load(open(out / "config.json"))["finished"] is True
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-1] == 30
    load_checkpoint(str(out))


# ----------------------------------------------------------------------------- save first, then evaluate

def test_a_failing_final_evaluation_leaves_a_loadable_model_that_resume_evaluates(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", str(ckpts / "corpus.txt"), *TINY, "--max-iters", "4", "--out", str(out)]

    def broken_sampling(*a, **k):
        raise RuntimeError("sampling failed")
    monkeypatch.setattr(pretrain, "print_sample", broken_sampling)
    refused(pretrain.main, argv, "the final evaluation failed (RuntimeError: sampling failed",
            "eval_error.txt", "--resume")
    config = json.load(open(out / "config.json"))
    assert config["finished"] is False and config["step"] == 4 and "train_loss" in config["metrics"]
    load_checkpoint(str(out))
    assert "broken_sampling" in (out / "eval_error.txt").read_text()
    monkeypatch.undo()
    m = pretrain.main(["--resume", "--out", str(out)])   # no step runs: the evaluation alone
    config = json.load(open(out / "config.json"))
    assert config["finished"] is True and "val_loss" in m and m["train_loss"] == config["metrics"]["train_loss"]


def test_a_failing_sft_evaluation_keeps_the_merged_lora_model(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "run"
    data = str(ckpts / "jsonl" / "train.jsonl")
    monkeypatch.setattr(sft, "task_accuracy", lambda *a, **k: 1 / 0)
    refused(sft.main, ["--init", str(ckpts / "wide"), "--data", data, "--val-data", data, "--lora", "2",
                       "--max-iters", "2", "--batch-size", "2", "--recall-limit", "0", "--threads", "1",
                       "--out", str(out)], "the final evaluation failed (ZeroDivisionError")
    model, _, config = load_checkpoint(str(out))
    assert config["finished"] is False and config["stage"] == "sft" and (out / "adapter_model.safetensors").exists()


def test_a_failing_dpo_evaluation_keeps_the_policy(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "run"
    pairs = str(ckpts / "jsonl" / "pairs.jsonl")

    def broken(*a, **k):
        raise RuntimeError("sampling failed")
    monkeypatch.setattr(dpo, "heldout_eval", broken)
    refused(dpo.main, ["--init", str(ckpts / "wide"), "--data", pairs, "--val-data", pairs, "--max-iters", "2",
                       "--batch-size", "2", "--eval-prompts", str(ckpts / "prompts.jsonl"), "--threads", "1",
                       "--out", str(out)],
            "the final evaluation failed (RuntimeError: sampling failed")
    _, _, config = load_checkpoint(str(out))
    assert config["finished"] is False and config["stage"] == "dpo" and config["step"] == 2


def test_a_failing_reward_evaluation_keeps_the_reward_model(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "run"
    pairs = str(ckpts / "jsonl" / "pairs.jsonl")
    real, calls = reward.evaluate, []

    def broken_at_the_end(*a, **k):   # the first call scores the untrained model; the second is the final one
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scoring failed")
        return real(*a, **k)
    monkeypatch.setattr(reward, "evaluate", broken_at_the_end)
    refused(reward.main, ["--init", str(ckpts / "wide"), "--data", pairs, "--val-data", pairs, "--max-iters", "2",
                          "--batch-size", "2", "--threads", "1", "--out", str(out)],
            "the final evaluation failed (RuntimeError: scoring failed")
    rm, _, config = reward.load_reward_model(str(out))
    assert config["finished"] is False and config["step"] == 2 and "train_loss" in config["metrics"]
