"""sample.py: seeds, greedy, template vs raw, piped prompts, streaming, chat history within the context."""
import io
import os
import select
import subprocess
import sys
import time

import pytest
import torch

import data
import sample
from common import UserError
from conftest import run_script
from gpt import GPT, GPTConfig, generate, load_checkpoint, save_checkpoint
from hf import export_hf
from tokenizer import eos_id, pad_id

try:
    import pty
except ImportError:  # no pseudo-terminals on Windows
    pty = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, small_enc):
    """One tiny random model saved under each stage name, plus a stage-less config and a HF export."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32)).eval()
    root = tmp_path_factory.mktemp("ckpts")
    for stage in ("pretrain", "domain", "import", "sft", "dpo", "ppo", "reward"):
        save_checkpoint(str(root / stage), model, small_enc, {"stage": stage})
    save_checkpoint(str(root / "nostage"), model, small_enc, {})
    export_hf(model, str(root / "hf"), small_enc)
    return root


def run_main(*argv, stdin=""):
    out = io.StringIO()
    sample.main([str(a) for a in argv], stdin=io.StringIO(stdin), out=out)
    return out.getvalue()


def greedy_text(path, ids, n):
    model, enc, _ = load_checkpoint(str(path))
    out = generate(model, [ids], n, eos_id=eos_id(enc), pad_id=pad_id(enc), greedy=True)[0]
    return enc.decode([t for t in out if t != eos_id(enc)])


def test_same_seed_same_text_other_seed_other_text(ckpts):
    opts = ["--temperature", "1", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "12", "--num-samples", "2"]
    a = run_main(ckpts / "pretrain", "the river", *opts, "--seed", "1")
    b = run_main(ckpts / "pretrain", "the river", *opts, "--seed", "1")
    c = run_main(ckpts / "pretrain", "the river", *opts, "--seed", "2")
    assert a == b and a != c
    first, second = a.rstrip("\n").split("\n---\n")  # two samples, both continuing the raw prompt
    assert first.startswith("the river") and second.startswith("the river") and first != second


def test_temperature_0_is_gpt_generate_greedy(ckpts, small_enc):
    out = run_main(ckpts / "pretrain", "the flag of", "--temperature", "0", "--max-new-tokens", "10", "--seed", "5")
    ids = [eos_id(small_enc)] + small_enc.encode_ordinary("the flag of")
    assert out == "the flag of" + greedy_text(ckpts / "pretrain", ids, 10) + "\n"


@pytest.mark.parametrize("stage,template", [("pretrain", False), ("domain", False), ("import", False),
                                            ("hf", False), ("nostage", False),
                                            ("sft", True), ("dpo", True), ("ppo", True)])
def test_template_or_raw_from_the_checkpoint_and_by_flag(ckpts, small_enc, stage, template):
    _, _, config = load_checkpoint(str(ckpts / stage))
    assert sample.use_template(config)[0] is template
    assert sample.use_template(config, True)[0] is True and sample.use_template(config, False)[0] is False
    # what the model reads, end to end: the greedy answer to the template or to EOS + the raw text
    p = "Write a review of the oak bicycle."
    rendered = small_enc.encode_ordinary(data.format_prompt(p))
    raw = [eos_id(small_enc)] + small_enc.encode_ordinary(p)
    args = ["--temperature", "0", "--max-new-tokens", "8"]
    want = greedy_text(ckpts / stage, rendered if template else raw, 8)
    assert run_main(ckpts / stage, p, *args) == (want.strip() if template else p + want) + "\n"
    flipped = "--raw" if template else "--template"
    want = greedy_text(ckpts / stage, raw if template else rendered, 8)
    assert run_main(ckpts / stage, p, *args, flipped) == (p + want if template else want.strip()) + "\n"


def test_a_reward_model_is_refused(ckpts):
    _, _, config = load_checkpoint(str(ckpts / "reward"))
    for override in (None, True, False):
        with pytest.raises(UserError, match="reward model"):
            sample.use_template(config, override)


def test_piped_lines_are_answered_one_by_one(ckpts, small_enc):
    """stdin a pipe: each line answered once, without the history; greedy, so each answer is the
    one-shot greedy answer of that line alone."""
    r = subprocess.run([sys.executable, "sample.py", str(ckpts / "sft"), "--temperature", "0", "--max-new-tokens", "8"],
                       cwd=ROOT, input="What is 2 plus 3?\n\nReview the copper kettle.\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = ""
    for p in ("What is 2 plus 3?", "Review the copper kettle."):
        want += f"> {p}\n" + greedy_text(ckpts / "sft", small_enc.encode_ordinary(data.format_prompt(p)), 8).strip() + "\n"
    assert r.stdout == want
    assert "instruction template" in r.stderr and "Traceback" not in r.stderr


def test_bad_checkpoint_or_option_is_one_line_exit_2(tmp_path, ckpts):
    r = run_script("sample.py", tmp_path / "nothing", "hi")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: no checkpoint at")
    for bad, name in [(["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                      (["--num-samples", "0"], "--num-samples"), (["--max-new-tokens", "0"], "--max-new-tokens")]:
        with pytest.raises(SystemExit, match="2"):  # argparse, through the option's range type
            run_main(ckpts / "sft", "hi", *bad)


@pytest.mark.parametrize("opts", [dict(greedy=True), dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_on_token_streams_the_tokens_generate_returns(ckpts, small_enc, opts):
    model, enc, _ = load_checkpoint(str(ckpts / "sft"))
    ids = enc.encode_ordinary(data.format_prompt("Review the copper kettle."))
    streamed = []
    batched = generate(model, [ids, ids[3:]], 20, eos_id=eos_id(enc), pad_id=pad_id(enc),
                       generator=torch.Generator().manual_seed(3), on_token=lambda t: streamed.append(t.tolist()),
                       **opts)
    for row, out in enumerate(batched):  # each step's tokens arrive in order; after EOS only padding follows
        assert [s[row] for s in streamed][:len(out)] == out and len(out) >= 1


def test_stream_answer_writes_the_decoded_answer_as_it_goes(ckpts):
    model, enc, _ = load_checkpoint(str(ckpts / "pretrain"))
    args = sample.parse_args([str(ckpts / "pretrain"), "--max-new-tokens", "15"])
    ids = [eos_id(enc)] + enc.encode_ordinary("the inn")
    out = io.StringIO()
    text = sample.stream_answer(model, enc, ids, args, torch.Generator().manual_seed(0), False, out)
    toks = sample.answers(model, enc, ids, args, torch.Generator().manual_seed(0))
    assert out.getvalue() == text + "\n" and text == toks[0]


def test_history_is_cut_from_the_oldest_turn_to_fit_the_context(small_enc):
    turns = [(f"the river {i}", "is green") for i in range(6)]
    for template, block in ((True, 100), (False, 48)):
        kept, ids = sample.fit_history(small_enc, turns, "and the flag?", template, block, max_new_tokens=10)
        assert len(ids) + 10 <= block                   # room for the answer within the context
        assert 0 < len(kept) < len(turns) and kept == turns[-len(kept):]   # the newest turns stay
        longer = turns[-len(kept) - 1:]                 # one more turn would not have fit
        assert len(sample.prompt_ids(small_enc, longer, "and the flag?", template)) + 10 > block
        kept, _ = sample.fit_history(small_enc, turns, "hi", template, block_size=400, max_new_tokens=10)
        assert kept == turns                            # all kept when they fit
    # the room kept for the answer is at most half the context, so a long --max-new-tokens keeps history
    kept, ids = sample.fit_history(small_enc, turns, "and the flag?", False, 48, max_new_tokens=1000)
    assert kept and len(ids) + 24 <= 48
    with pytest.raises(UserError, match="shorten"):
        sample.fit_history(small_enc, [], "word " * 60, True, block_size=48, max_new_tokens=10)


def test_chat_keeps_history_resets_and_stays_within_the_context(ckpts):
    model, enc, _ = load_checkpoint(str(ckpts / "sft"))
    args = sample.parse_args([str(ckpts / "sft"), "--max-new-tokens", "12", "--temperature", "0"])
    stdin = io.StringIO("first question\nsecond question\n/reset\nthird question\n" +
                        "".join(f"more {i}\n" for i in range(6)))
    out = io.StringIO()
    turns = sample.chat(model, enc, args, True, torch.Generator(), lambda: sample.read_echoed(stdin, out), out)
    users = [u for u, _ in turns]
    assert users[-1] == "more 5" and "first question" not in users and "second question" not in users
    assert len(users) < 7                                 # third question + 6 more did not all fit in 48 tokens
    earlier, (last, _) = turns[:-1], turns[-1]
    assert len(sample.prompt_ids(enc, earlier, last, True)) + 12 <= 48
    assert "> more 5\n" + turns[-1][1] in out.getvalue()  # the last answer, streamed after its prompt


@pytest.mark.skipif(pty is None, reason="needs a POSIX pseudo-terminal")
def test_terminal_chat_answers_resets_and_quits_on_ctrl_d(ckpts):
    """stdin a real terminal (a pseudo-terminal): the chat prompts with "> ", answers, clears the
    history on /reset and exits 0 on Ctrl-D."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: sample.py on the terminal
        try:
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "sample.py", str(ckpts / "sft"), "--max-new-tokens", "5"])
        finally:
            os._exit(127)
    shown = b""
    for keys in (b"Review the copper kettle.\r", b"/reset\r", b"\x04"):
        deadline = time.time() + 60
        while not shown.endswith(b"> ") and time.time() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                shown += os.read(fd, 4096)
        os.write(fd, keys)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if select.select([fd], [], [], 0.1)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                shown += chunk
        except OSError:  # the child closed the terminal
            break
    _, status = os.waitpid(pid, 0)
    text = shown.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "> Review the copper kettle." in text and "(history cleared)" in text and "Traceback" not in text
