import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

import common

torch.set_num_threads(min(2, torch.get_num_threads()))

# gloo can abort a process while it tears down after its work is done ("terminate called without an active
# exception", SIGABRT); seen about once in ten clean-clone runs of the two-process tests
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def sigint_default():
    """preexec_fn for a child that a test stops with SIGINT: a shell starts background jobs with SIGINT
    ignored, and the child would inherit that; a terminal's Ctrl-C reaches a process that has the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """Each test leaves SIGINT's and SIGTERM's handlers as it found them: a stage run in this process
    installs its own (training.StopFlag), and a later test that sends itself a signal must not meet them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def torchrun(script, argv, cwd, nproc=2, timeout=240):
    """The project's `script` under torchrun, nproc gloo processes on CPU, one thread each, on a free port (so
    parallel test runs never collide) -> the finished process, asserted to exit 0. Run once more if a process
    died of gloo's teardown abort, from cwd as it was before the first try (a run stopped with --stop-at has
    saved its state by then, and the same command would refuse to overwrite it): the test then checks the
    results of a run that completed, so the retry hides nothing it asserts. The outputs live under cwd."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--", os.path.join(ROOT, script), *map(str, argv)]   # "--": the script's options are not torchrun's
    kw = dict(cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as before:
        shutil.copytree(cwd, before, dirs_exist_ok=True)
        r = subprocess.run(cmd, **kw)
        if r.returncode != 0 and GLOO_TEARDOWN_ABORT in r.stderr:
            shutil.rmtree(cwd)
            shutil.copytree(before, cwd)
            r = subprocess.run(cmd, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_script(script, *argv):
    """`python script argv` run in this process, as its last line runs it (common.run_cli(main), which
    test_layout checks every command has) -> a subprocess.CompletedProcess with the exit code, stdout and
    stderr. It tests the same code as the command and saves the interpreter's start and torch's import
    (1.5-2 s) per call; a test about the process itself (signals, a closed pipe, torchrun) runs the command.
    An exception run_cli lets through is printed as the interpreter prints it, with exit code 1."""
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                common.run_cli(lambda: main(list(map(str, argv))))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def quick_pretrain_options():
    """run.sh --quick's pre-training options, read from run.sh itself (a resumed run must be given the same)."""
    text = open(os.path.join(ROOT, "run.sh"), encoding="utf-8").read()
    return shlex.split(re.search(r'^  PRE="(.*)"$', text, re.M).group(1))


@pytest.fixture(scope="session")
def quick_pipeline(tmp_path_factory):
    """`bash run.sh --quick` once per test run, for every test that needs the whole pipeline: first pre-training
    stopped at step 5, so the run must resume it rather than skip it or start again. -> (out dir, run.sh's stdout)."""
    out = tmp_path_factory.mktemp("quick") / "out"
    r = subprocess.run([sys.executable, "pretrain.py", "--out", str(out / "pretrain"), *quick_pretrain_options(),
                        "--stop-at", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "stopped at step 5" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(["bash", "run.sh", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    return out, r.stdout


@pytest.fixture
def tiny_config():
    from gpt import GPTConfig
    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_model(tiny_config):
    from gpt import GPT
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def small_text():
    words = ("the flag of belmora is green . the river of tosk is wide . seven plus five is twelve . "
             "a good kettle , a bad inn , an excellent pie . ").split()
    import random
    rng = random.Random(0)
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40))


@pytest.fixture(scope="session")
def small_enc(small_text):
    from tokenizer import train_tokenizer
    return train_tokenizer(small_text, 300)
