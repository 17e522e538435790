"""prompting.py: the prompt layouts string for string, the exact candidate argmax against scoring
each candidate alone, no test example inside its own prompt, and the CLI end to end on a tiny model."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import prompting
import world
from common import UserError
from gpt import GPT, GPTConfig, save_checkpoint

SHOTS = [{"instruction": "Answer the arithmetic question with a number.", "input": "What is 12 + 30?", "output": "42",
          "cot": "2 + 0 = 2, write 2. 1 + 3 = 4, write 4. The answer is 42."},
         {"instruction": "Answer the arithmetic question with a number.", "input": "What is 58 + 7?", "output": "65",
          "cot": "8 + 7 = 15, write 5 carry 1. 5 + 0 + 1 = 6, write 6. The answer is 65."}]
QUERY = {"instruction": "Answer the arithmetic question with a number.", "input": "What is 19 + 23?", "output": "42",
         "cot": "9 + 3 = 12, write 2 carry 1. 1 + 2 + 1 = 4, write 4. The answer is 42."}


# ----------------------------------------------------------------------------- the layouts

def test_zero_shot_prompt_is_the_one_template():
    assert prompting.zero_shot_prompt("Answer the arithmetic question with a number.", "What is 19 + 23?") == (
        "Instruction: Answer the arithmetic question with a number.\nInput: What is 19 + 23?\nOutput:")
    assert prompting.zero_shot_prompt("Name a colour.") == "Instruction: Name a colour.\nOutput:"
    assert prompting.few_shot_prompt([], prompting.as_pair(QUERY)[0]) == prompting.zero_shot_prompt(
        QUERY["instruction"], QUERY["input"])


def test_k_shot_prompt_examples_then_query_instruction_once():
    shots = [prompting.as_pair(e) for e in SHOTS]
    assert prompting.few_shot_prompt(shots, prompting.as_pair(QUERY)[0]) == (
        "Instruction: Answer the arithmetic question with a number.\n"
        "Input: What is 12 + 30?\nOutput: 42\n"
        "Input: What is 58 + 7?\nOutput: 65\n"
        "Input: What is 19 + 23?\nOutput:")


def test_k_shot_prompt_with_different_instructions_repeats_each_block():
    shots = [("Instruction: Name a colour.\nOutput:", " red"), ("Instruction: Q\nInput: x\nOutput:", " y")]
    assert prompting.few_shot_prompt(shots, "Instruction: Q\nInput: z\nOutput:") == (
        "Instruction: Name a colour.\nOutput: red\nInstruction: Q\nInput: x\nOutput: y\nInstruction: Q\nInput: z\nOutput:")


def test_chain_of_thought_prompt_shows_the_worked_steps():
    assert prompting.chain_of_thought_prompt(SHOTS, QUERY) == (
        "Instruction: Answer the arithmetic question. Add the digits column by column.\n"
        "Input: What is 12 + 30?\nOutput: 2 + 0 = 2, write 2. 1 + 3 = 4, write 4. The answer is 42.\n"
        "Input: What is 58 + 7?\nOutput: 8 + 7 = 15, write 5 carry 1. 5 + 0 + 1 = 6, write 6. The answer is 65.\n"
        "Input: What is 19 + 23?\nOutput:")
    assert world.extract_answer_number(QUERY["cot"]) == 42


def test_prompts_look_like_the_pretraining_qa_pages():
    """The shared-instruction layout occurs verbatim in pre-training: a k-shot prompt plus its answer is
    what a Q/A page of the corpus looks like."""
    w = world.make_world(1337)
    pages = [d for d in world.pretrain_docs(w) if d.startswith("Instruction: ") and
             d.count("Instruction: ") == 1]
    assert pages
    page = pages[0].split("\n")
    instruction, pairs = page[0][len("Instruction: "):], page[1:]
    exs = [{"instruction": instruction, "input": pairs[i][len("Input: "):], "output": pairs[i + 1][len("Output: "):]}
           for i in range(0, len(pairs), 2)]
    prompt = prompting.few_shot_prompt([prompting.as_pair(e) for e in exs[:-1]], prompting.as_pair(exs[-1])[0])
    assert prompt + data.format_completion(exs[-1]["output"]) == pages[0]


def test_answers_are_cut_where_the_next_example_begins():
    assert prompting.cut_answer(" green\nInput: What colour") == "green"
    assert prompting.cut_answer(" line one\nline two\nInput: q", multiline=True) == "line one\nline two"
    assert prompting.contains_answer("The flag of Zowick is grey.", "grey") == 1.0
    assert prompting.contains_answer("greyish", "grey") == 0.0
    assert world.carries(58, 7) == 1 and world.carries(12, 30) == 0 and world.carries(999, 1) == 3


# ----------------------------------------------------------------------------- the exact decoder

def test_candidate_argmax_equals_scoring_each_candidate_alone(small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [small_enc.encode_ordinary(t) for t in ("the flag of belmora is", "a good kettle ,",
                                                      "seven plus five is twelve . the river of tosk is wide")]
    cands = [small_enc.encode_ordinary(t) for t in (" green", " an excellent pie", " wide .", " bad")]
    lp = prompting.candidate_logprobs(model, small_enc, prompts, cands, batch=5)
    best = prompting.argmax_candidates(model, small_enc, prompts, cands, batch=5)
    brute = torch.zeros(len(prompts), len(cands), dtype=torch.float64)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            for c, y in enumerate(cands):  # one unpadded sequence at a time, float64 log-softmax
                logits = model(torch.tensor([p + y]))[0].double()
                logp = F.log_softmax(logits, -1)
                brute[b, c] = sum(logp[len(p) - 1 + t, y[t]] for t in range(len(y)))
    assert torch.allclose(lp.double(), brute, atol=1e-4)
    assert best == brute.argmax(-1).tolist()
    assert len(set(best)) > 1 or brute.shape[1] > 1


# ----------------------------------------------------------------------------- no leaks

def test_no_test_example_is_in_its_own_prompt():
    tasks = world.task_sets(world.make_world(1337))
    for task in prompting.TASKS:
        pool, test = tasks[task]["train"], tasks[task]["test"][:40]
        draws = prompting.draw_shots(pool, len(test), 8, f"0/{task}")
        for cot in ((False, True) if task == "addition" else (False,)):
            for p, e, shots in zip(prompting.build_prompts(draws, test, cot=cot), test, draws):
                assert all(s in pool for s in shots)
                assert p.count(f"Input: {e['input']}\n") == 1 and p.endswith(f"Input: {e['input']}\nOutput:")
                assert e["input"] not in [s["input"] for s in shots]
    with pytest.raises(UserError, match="also one of its examples"):
        prompting.build_prompts([[QUERY]], [QUERY])


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture
def tiny_ckpt(tmp_path, small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=1024, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(str(tmp_path / "ckpt"), model, small_enc, {"stage": "pretrain", "args": {}, "metrics": {}})
    return str(tmp_path / "ckpt")


def test_cli_end_to_end_on_the_default_world(tmp_path, tiny_ckpt):
    out = tmp_path / "prompting"
    res = prompting.main(["--init", tiny_ckpt, "--out", str(out), "--n", "3", "--ks", "0,2", "--cot-ks", "0,1",
                          "--study-k", "2", "--orderings", "2", "--device", "cpu"])
    saved = json.load(open(out / "results.json"))
    s = saved["summary"]
    assert set(s["accuracy_by_k"]) == {"facts", "facts (answer contained)", "sentiment (greedy)",
                                       "sentiment (argmax over labels)", "addition"}
    assert all(0 <= v <= 1 for rows in s["accuracy_by_k"].values() for v in rows.values())
    assert set(s["order_spread"]) == set(prompting.TASKS) and s["order_spread"]["facts"]["orderings"] == 2
    assert set(s["addition_with_carries"]) == {"direct (k=0)", "direct (k=1)", "cot (k=0)", "cot (k=1)"}
    assert res["summary"] == s


def test_cli_skips_k_that_does_not_fit_the_context_and_says_so(tmp_path, small_enc, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=160, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(str(tmp_path / "c"), model, small_enc, {"stage": "pretrain", "args": {}, "metrics": {}})
    res = prompting.main(["--init", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--n", "2", "--ks", "0,8",
                          "--tasks", "sentiment", "--study-k", "1", "--orderings", "1", "--device", "cpu"])
    assert res["accuracy"]["sentiment"]["8"]["skipped"].startswith("sentiment k=8: skipped")
    assert res["summary"]["accuracy_by_k"]["sentiment (greedy)"]["8"] is None
    assert res["summary"]["accuracy_by_k"]["sentiment (greedy)"]["0"] is not None
    assert "exceeds the context of 160" in capsys.readouterr().out


def test_cli_on_user_task_files(tmp_path, tiny_ckpt):
    rows = [{"instruction": "Is it good?", "input": f"item {i}", "output": "yes" if i % 2 else "no"} for i in range(8)]
    task, shots = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    shots.write_text("".join(json.dumps(r) + "\n" for r in rows))  # overlaps the test file: never a shot for itself
    res = prompting.main(["--init", tiny_ckpt, "--out", str(tmp_path / "o"), "--task-file", str(task),
                          "--examples-file", str(shots), "--ks", "0,2", "--labels", "yes,no", "--device", "cpu"])
    r = json.load(open(tmp_path / "o" / "results.json"))["accuracy"]["test.jsonl"]
    assert set(r) == {"0", "2"} and all(0 <= r[k]["acc_argmax"] <= 1 for k in r)
    assert res["summary"]["accuracy_by_k"]["test.jsonl (argmax over labels)"]["2"] == round(r["2"]["acc_argmax"], 3)


def test_cli_refuses_a_prompt_longer_than_the_context(tmp_path, tiny_ckpt):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"instruction": "x " * 2000, "output": "y"}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl: example 1: prompt of \d+ tokens"):
        prompting.main(["--init", tiny_ckpt, "--out", str(tmp_path / "o"), "--task-file", str(task), "--device", "cpu"])
