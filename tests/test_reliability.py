"""Interruption, crashes and untrusted files, across stages: nothing is lost, nothing runs code."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import data
import world
from common import UserError
from conftest import run_script
from gpt import load_checkpoint, save_checkpoint
from training import load_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
        "--batch-size", "4", "--recall-limit", "0", "--eval-tokens", "256", "--log-interval", "1"]


def small_corpus(tmp_path):
    text = "\n\n".join(world.pretrain_docs(world.make_world(1), size_chars=40_000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def final_loss(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)["metrics"]["train_loss"]


def wait_for_step(proc, out, step, timeout=120):
    """Wait until metrics.jsonl records `step` (the run is inside its loop)."""
    path, t0 = os.path.join(out, "metrics.jsonl"), time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and any(json.loads(line).get("step", 0) >= step for line in open(path)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()} {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("the run never reached the step")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """-> (the pretrain.py options of the signal tests, the final loss of the run never interrupted), that run
    made once in this process for both signals (one thread, like the runs it is compared with)."""
    tmp = tmp_path_factory.mktemp("signal")
    common = ["pretrain.py", "--data", small_corpus(tmp), *TINY, "--max-iters", "40", "--eval-interval", "1000",
              "--threads", "1"]
    r = run_script(*common, "--out", tmp / "full")
    assert r.returncode == 0, r.stderr
    return common, final_loss(tmp / "full")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_state_and_resume_ends_at_the_same_loss(tmp_path, sig, uninterrupted):
    common, full_loss = uninterrupted
    out = str(tmp_path / "interrupted")
    proc = subprocess.Popen([sys.executable, *common, "--out", out], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr  # stopped early: never mistaken for a finished run
    if "stopped at step" not in stdout:  # the signal came after the last step: nothing to resume
        pytest.skip("the run finished before the signal arrived")
    assert "Traceback" not in stderr and signal.Signals(sig).name in stderr
    resumed = run_script(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert final_loss(out) == full_loss


def test_sigkill_during_checkpoint_writes_leaves_the_last_checkpoint_loadable(tmp_path):
    corpus = small_corpus(tmp_path)
    out = str(tmp_path / "run")
    # a checkpoint (model + training state) after every step, so the kill lands inside or between writes
    proc = subprocess.Popen([sys.executable, "pretrain.py", "--data", corpus, *TINY, "--max-iters", "100000",
                             "--eval-interval", "1", "--eval-tokens", "64", "--out", out], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(proc, out, 4)
    time.sleep(0.37)
    proc.kill()
    proc.wait()
    model, enc, config = load_checkpoint(out)  # model.safetensors, tokenizer.json, config.json all whole
    opt = make_optimizer(model, 1e-3)
    step, _ = load_train_state(out, model, opt)
    assert step >= 4 and config["step"] >= 4
    leftovers = [f for f in os.listdir(out) + os.listdir(os.path.join(out, "resume")) if f.endswith(".tmp")]
    assert len(leftovers) <= 1  # at most the file being written when the kill came, never loaded


def test_a_pickle_renamed_to_safetensors_is_refused_without_running_it(tmp_path, tiny_model, small_enc):
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, tiny_model, small_enc, {"stage": "test"})
    marker = tmp_path / "pwned"
    # a pickle whose loading would create a file: torch.load would run it, safetensors never does
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(payload)
    with pytest.raises(UserError, match="safetensors"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_no_pickle_eval_or_exec_in_the_code():
    import re
    banned = re.compile(r"torch\.load\(|^\s*(import|from) (pickle|dill|cloudpickle)|(?<![\w.])(eval|exec)\(|yaml\.load\(")
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            for i, line in enumerate(open(os.path.join(ROOT, name)), 1):
                assert not banned.search(line), f"{name}:{i}: {line.strip()}"


def test_a_signal_inside_tiktokens_thread_pool_arrives_after_it(small_enc):
    """Ctrl-C while encode_ordinary_batch runs (before the fix it could leave the pool's workers waiting on a
    lock the interrupted main thread held: a hung pretrain.py, seen in run.sh's Ctrl-C test): the batch
    finishes, then the KeyboardInterrupt comes, and signals flow again after it."""
    class Enc:
        eot_token = small_enc.eot_token

        def encode_ordinary_batch(self, docs):
            os.kill(os.getpid(), signal.SIGINT)   # delivered now, were it not deferred
            time.sleep(0.05)
            self.finished = True
            return [small_enc.encode_ordinary(d) for d in docs]

    enc = Enc()
    # Python's own Ctrl-C handler, whatever this process started with (a shell's background job ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        data.encode_documents(["one doc", "two docs"], enc)
    assert enc.finished
    with pytest.raises(KeyboardInterrupt):   # nothing left blocked
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
