"""Evaluations that several stages and the report share, so that every checkpoint is
measured the same way: fact recall, task accuracy with format adherence, and the alignment
figures of DPO and PPO (gold reward, win rate against a reference policy, sequence KL).
"""

import contextlib
import math
import re
from collections import Counter

import numpy as np
import torch

import data
import world
from common import UserError
from gpt import completion_logprobs, cross_entropy_loss, generate
from tokenizer import eos_id, pad_id
from training import gather_chunks, my_chunks


def batched(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ----------------------------------------------------------------------------- judges that compare with a reference

def normalize(text):
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction, reference):
    """1.0 if the answers are equal after strip, lowercase, trailing period removed; else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def number_match(prediction, reference):
    """1.0 if the number after the worked steps (world.extract_answer_number: the last "The answer is N", or
    an answer that is a bare number) equals the reference's; else 0.0. "... write 13. The answer is 132."
    matches "132"; steps without a final answer match nothing."""
    got = world.extract_answer_number(prediction)
    return float(got is not None and got == world.extract_answer_number(reference))


def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def jaccard(a, b):
    """|A ∩ B| / |A ∪ B| over the sets of lowercase words (1.0 if both are empty)."""
    A, B = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(A & B) / len(A | B) if A | B else 1.0


def bleu(candidate, reference, max_n=4):
    """Sentence BLEU = BP * exp(1/N sum_n log p_n), N = max_n, p_n = clipped n-gram precision:
    p_n = sum_g min(count_cand(g), count_ref(g)) / (number of candidate n-grams). Add-one smoothing for
    n > 1 (p_n = (m_n + 1) / (c_n + 1), Lin & Och 2004) so one missing 4-gram does not zero the score;
    p_1 is not smoothed (no word in common -> 0). BP = 1 if c > r else exp(1 - r/c), c, r = lengths."""
    c, r = words(candidate), words(reference)
    if not c:
        return 0.0
    logp = 0.0
    for n in range(1, max_n + 1):
        cand, ref = Counter(zip(*[c[i:] for i in range(n)])), Counter(zip(*[r[i:] for i in range(n)]))
        m, total = sum(min(k, ref[g]) for g, k in cand.items()), sum(cand.values())
        if n == 1 and m == 0:
            return 0.0
        logp += math.log(m / total if n == 1 else (m + 1) / (total + 1))
    bp = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return bp * math.exp(logp / max_n)


def rouge_l(candidate, reference):
    """ROUGE-L F1 (beta = 1): L = |LCS(c, r)| over words, P = L/|c|, R = L/|r|, F = 2PR / (P + R)."""
    c, r = words(candidate), words(reference)
    prev = [0] * (len(r) + 1)
    for x in c:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, y in enumerate(r):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    L = prev[-1]
    return 0.0 if L == 0 else 2 * (L / len(c)) * (L / len(r)) / (L / len(c) + L / len(r))


# ----------------------------------------------------------------------------- language modelling

def token_bytes(enc):
    """Bytes of each token id, to turn nats per token into bits per byte."""
    table = torch.zeros(enc.n_vocab)
    for i in range(enc.n_vocab):
        try:
            table[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # an id that is no token (gaps in some vocabularies)
            pass
    return table


@torch.no_grad()
def text_loss(model, enc, tokens, block_size, max_tokens=65536, batch_size=16, device="cpu", autocast=None):
    """Mean next-token cross-entropy on held-out text, in nats per token, over fixed contiguous windows
    of block_size; and bits per byte = sum of nats / (ln 2 * bytes those tokens decode to), which does
    not depend on the tokenizer. Perplexity = exp(nats per token)."""
    was_training = model.training
    model.eval()
    T = block_size
    n = min(len(tokens) - 1, max_tokens) // T * T
    if n == 0:
        raise UserError(f"held-out text has {len(tokens)} tokens, fewer than one block of {T}")
    x = torch.as_tensor(np.asarray(tokens[:n], dtype=np.int64)).view(-1, T)
    y = torch.as_tensor(np.asarray(tokens[1:n + 1], dtype=np.int64)).view(-1, T)
    nats = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with (autocast or contextlib.nullcontext)():
            logits = model(xb)
        nats += cross_entropy_loss(logits.float(), yb).item() * yb.numel()
    model.train(was_training)
    nbytes = token_bytes(enc)
    return nats / n, nats / (math.log(2) * nbytes[y.flatten()].sum().item())


# ----------------------------------------------------------------------------- knowledge

def cloze_hit(continuation, answer):
    """The continuation starts with the answer as a whole word: " green." hits "green", " greenish" does not."""
    text, answer = continuation.strip().lower(), answer.strip().lower()
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()


def fact_recall(model, enc, cloze, batch=64):
    """Share of cloze prompts ("The flag of X is") whose greedy continuation is the fact's answer.
    A prompt starts after EOS, as every document does in pre-training."""
    hits = 0
    for chunk in batched(cloze, batch):
        prompts = [[eos_id(enc)] + enc.encode_ordinary(c["prompt"]) for c in chunk]
        outs = generate(model, prompts, 6, eos_id=eos_id(enc), pad_id=pad_id(enc), greedy=True)
        hits += sum(cloze_hit(enc.decode(strip_eos(out, enc)), c["answer"]) for c, out in zip(chunk, outs))
    return hits / max(1, len(cloze))


def strip_eos(ids, enc):
    return ids[:-1] if ids and ids[-1] == eos_id(enc) else ids


# ----------------------------------------------------------------------------- instruction following

def format_ok(task, answer):
    """The expected form of an answer, per task: one label, one number, one short phrase."""
    answer = answer.strip()
    if task == "custom":  # user data: any non-empty answer (that ends with EOS, checked by the caller)
        return bool(answer)
    if not answer or "\n" in answer:
        return False
    if task == "sentiment":
        return answer in world.SENTIMENT_LABELS
    if task == "addition":
        return answer.replace(",", "").isdigit() or world.extract_answer_number(answer) is not None
    if task in ("facts", "domain_facts", "story"):
        return len(answer.split()) <= 6
    return True


def task_accuracy(model, enc, examples, task, max_new_tokens=24, batch=64, judge=exact_match):
    """Greedy answers to Alpaca examples -> accuracy by `judge` (exact match, or number_match for answers
    after worked steps) and format adherence (the answer ends with EOS and has the task's form).
    Returns (accuracy, format_adherence, predictions)."""
    correct = formatted = 0
    preds = []
    for chunk in batched(examples, batch):
        prompts = [enc.encode_ordinary(e["prompt"] if "prompt" in e else data.format_prompt(e["instruction"], e.get("input", "")))
                   for e in chunk]
        outs = generate(model, prompts, max_new_tokens, eos_id=eos_id(enc), pad_id=pad_id(enc), greedy=True)
        for e, out in zip(chunk, outs):
            text = enc.decode(strip_eos(out, enc)).strip()
            preds.append(text)
            correct += judge(text, e["output"])
            formatted += bool(out) and out[-1] == eos_id(enc) and format_ok(task, text)
    n = max(1, len(examples))
    return correct / n, formatted / n, preds


def addition_cot_accuracy(model, enc, examples, max_new_tokens=80, batch=64):
    """Additions answered with worked steps: the prompt asks for the column steps (world.TASK_INSTRUCTIONS
    "addition_cot", zero-shot), greedy decoding, and an answer counts when the number after the steps is
    the sum (number_match). Returns (accuracy, format adherence, predictions) as task_accuracy does."""
    worked = [{**e, "instruction": world.TASK_INSTRUCTIONS["addition_cot"]} for e in examples]
    return task_accuracy(model, enc, worked, "addition", max_new_tokens, batch, judge=number_match)


# ----------------------------------------------------------------------------- alignment

def mean_ci95(xs):
    """Mean and the half-width of its normal-approximation 95% interval, 1.96 * s / sqrt(n)."""
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, 1.96 * s / math.sqrt(n)


def names_the_item(prompt, completion, items):
    """1.0 if the review names what the prompt asked about ("copper kettle" for "the copper kettle"),
    else 0.0: a check outside every reward. The lexicon judge ignores it, so a policy that games the
    judge with positive words about anything at all shows up here."""
    asked = [i for i in items if i.lower() in prompt.lower()]
    if not asked:
        return 0.0
    name = max(asked, key=len).lower().removeprefix("the ").strip()
    return float(name in completion.lower())


def on_topic_sentiment(prompt, completion, items):
    """The gold objective with headroom: the lexicon sentiment score s(y) in (-1, 1) of a review, counted
    only when the review names the item the prompt asked about, else the minimum -1:
        g(x, y) = s(y) if names_the_item(x, y) else -1.
    No reward model is trained on it, and piling positive words onto a review of nothing in particular
    (which s alone rewards) scores the worst value here."""
    return world.sentiment_score(completion) if names_the_item(prompt, completion, items) else -1.0


def win_rate(scores, baseline_scores):
    """Share of prompts where the policy's completion scores above the baseline's; ties count half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))
    return wins / max(1, len(scores))


# Under torchrun every process calls the evaluation: the prompts go in fixed-size chunks, chunk k is handled by
# process k mod N, and the results are gathered in prompt order, so every process gets the whole set and the
# figures do not depend on N (nor on which process sampled a chunk).

def chunk_seed(seed, k):
    """The sampling generator's seed for chunk k of the prompts, a pure function of (seed, k): chunk 0 keeps
    `seed`, so a set of prompts that fits one chunk samples as a single generator seeded with `seed` does."""
    return seed + 1_000_003 * k


@torch.no_grad()
def sequence_kl(policy, ref, prompt_ids, completions, enc, device, batch=32, ctx=None):
    """KL(pi || pi_ref) of whole completions, estimated on samples y ~ pi:
    KL ≈ mean_i [log pi(y_i|x_i) - log pi_ref(y_i|x_i)], each log pi a sum over the completion's tokens.
    Under torchrun each process scores its chunks of `batch` rows; every process gets the mean of all."""
    mine = {}
    for k, lo, hi in my_chunks(len(prompt_ids), batch, ctx):
        b = data.completion_batch(prompt_ids[lo:hi], completions[lo:hi], pad_id(enc))
        b = {key: v.to(device) for key, v in b.items()}
        mine[k] = (completion_logprobs(policy, b).sum(-1) - completion_logprobs(ref, b).sum(-1)).tolist()
    total = gather_chunks(mine, ctx)
    return sum(total) / max(1, len(total))


def sample_chunks(model, enc, prompt_ids, max_new_tokens, seed, temperature=1.0, batch=64, ctx=None):
    """{k: completions} of the chunks of `batch` prompts this process samples (my_chunks), chunk k with its own
    generator seeded chunk_seed(seed, k): a chunk's samples depend on (seed, k) and its prompts only."""
    device = next(model.parameters()).device
    mine = {}
    for k, lo, hi in my_chunks(len(prompt_ids), batch, ctx):
        gen = torch.Generator(device=device).manual_seed(chunk_seed(seed, k))
        mine[k] = generate(model, prompt_ids[lo:hi], max_new_tokens, eos_id=eos_id(enc), pad_id=pad_id(enc),
                           temperature=temperature, generator=gen)
    return mine


def sample_completions(model, enc, prompt_ids, max_new_tokens, seed, temperature=1.0, batch=64, ctx=None):
    """One sampled completion (token ids, ending with EOS when it ended) per prompt, in prompt order, on
    every process; under torchrun each process samples its chunks (sample_chunks) and they are gathered."""
    return gather_chunks(sample_chunks(model, enc, prompt_ids, max_new_tokens, seed, temperature, batch, ctx), ctx)


def alignment_eval(policy, ref, enc, prompts, judge, max_new_tokens=48, seed=0, ref_completions=None,
                   return_completions=False, ctx=None):
    """The figures by which DPO and PPO are judged, on held-out prompts (strings):
    gold reward of the policy's samples (mean and 95% interval), win rate against the reference
    policy's samples for the same prompts, sequence KL(pi || pi_ref), EOS rate, mean length.
    Sampling is at temperature 1, the distribution whose KL is reported. Under torchrun (ctx) every process
    calls it: each samples and scores its chunks of the prompts, and every process gets the figures of all."""
    device = next(policy.parameters()).device
    prompt_ids = [enc.encode_ordinary(p) for p in prompts]
    completions = sample_completions(policy, enc, prompt_ids, max_new_tokens, seed, ctx=ctx)
    if ref_completions is None:
        ref_completions = sample_completions(ref, enc, prompt_ids, max_new_tokens, seed, ctx=ctx)
    texts = [enc.decode(strip_eos(c, enc)).strip() for c in completions]
    scores = [judge(t) for t in texts]
    ref_scores = [judge(enc.decode(strip_eos(c, enc)).strip()) for c in ref_completions]
    mean, ci = mean_ci95(scores)
    out = {"gold_reward": mean, "gold_reward_ci95": ci, "ref_gold_reward": sum(ref_scores) / len(ref_scores),
            "win_rate": win_rate(scores, ref_scores),
            "kl": sequence_kl(policy, ref, prompt_ids, completions, enc, device, ctx=ctx),
            "eos_rate": sum(bool(c) and c[-1] == eos_id(enc) for c in completions) / len(completions),
            "mean_len": sum(len(c) for c in completions) / len(completions),
            "samples": [{"prompt": p, "completion": t, "score": s} for p, t, s in list(zip(prompts, texts, scores))[:8]]}
    if return_completions:  # token ids, for further judges (e.g. a reward model)
        out["completions"] = completions
    return out
