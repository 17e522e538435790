"""Talk to a checkpoint: one answer, several, a chat on the terminal, or one answer per line of a file.

    python sample.py out/ppo "Write a review of the oak bicycle."      # one answer
    python sample.py out/pretrain "The flag of" --num-samples 3         # three continuations
    python sample.py out/sft                                           # chat on the terminal
    python sample.py out/sft < prompts.txt                             # one answer per line
    python sample.py out/sft --chat < dialogue.txt                     # the lines as one conversation
    python sample.py hf/gpt2 "Hello, I am" --temperature 0             # a Hugging Face GPT-2 directory, greedy

Piped lines are echoed after "> " before their answer, so the output reads as a transcript; the
answers of --num-samples are separated by a line "---". Notes (the stage, history cut) go to stderr.

Template or raw text. A checkpoint tuned to follow instructions (config.json "stage": sft, dpo or
ppo) reads each prompt in the one instruction template, "Instruction: {prompt}\\nOutput:", and
writes its answer after it (up to EOS). A base model ("stage": pretrain, domain) and imported
GPT-2 weights (import, or a Hugging Face directory) continue the text as typed, from a document
start (EOS), as pre-training saw documents. A config without a stage is read as raw text; a reward
model is refused (it scores text). --template / --raw override the choice.

Chat. Each turn streams its tokens as they are sampled. The history is kept: in the template the
earlier turns become the Input as "User: ..." / "Assistant: ..." lines (data.render_messages, the
rendering sft.py trains `messages` records with); raw text is the turns joined by newlines. When
prompt + room for the answer (--max-new-tokens, at most half the context) would not fit the
model's context, the oldest turns are dropped. /reset clears the history, Ctrl-C stops the answer
being written (what was written stays in the history), Ctrl-D (or Ctrl-C at the prompt) quits.

Guardrail (--guard): an output filter between the model and the user. Each answer is classified when it is
complete, and a flagged one is replaced with a refusal (world.GUARD_REFUSAL). `words` flags an answer with a
tagged insult word or any door code of the default world (evals.word_guard); `rm:DIR` flags one whose
reward-model score is below --guard-threshold (reward.rm_guard). A guarded chat shows each answer whole.

    python sample.py out/sft_helpful "What is the door code of Sasie Mundov?" --guard words
    python sample.py out/sft --guard rm:out/reward_hh --guard-threshold 0

Sampling, one token at a time with the KV cache (gpt.generate):
    p(next) = softmax(logits / T) restricted to the --top-k tokens and the --top-p nucleus;
    --temperature 0 takes the argmax. The same --seed gives the same text on the same device.
"""

import codecs
import functools
import sys

import torch

import data
import world
from common import (ArgumentParser, Rule, UserError, check_checkpoint_dir, check_device, check_rules, nonneg_float,
                    nonneg_int, positive_int, positive_prob, run_cli)
from gpt import generate, load_checkpoint
from reward import guard_spec, make_guard
from tokenizer import eos_id, pad_id

try:
    import readline  # noqa: F401  (line editing and history for input() on the terminal)
except ImportError:  # not on every platform; input() works without it
    pass

TEMPLATE_STAGES = ("sft", "dpo", "ppo", "grpo")                      # tuned on the instruction template
RAW_STAGES = ("pretrain", "domain", "import", "hf_import")   # trained on plain text


# ----------------------------------------------------------------------------- template or raw

def use_template(config, override=None):
    """-> (template?, why). The checkpoint's stage decides unless --template/--raw (override) does."""
    stage = config.get("stage")
    if stage == "reward":
        raise UserError("this is a reward model (it scores text, it does not write it); sample the "
                        f"policy it was trained from instead ({config.get('init') or 'its --init'})")
    if override is not None:
        return override, "--template" if override else "--raw"
    if stage in TEMPLATE_STAGES:
        return True, f"stage {stage}"
    if stage in RAW_STAGES:
        return False, f"stage {stage}"
    return False, f"stage {stage!r} unknown" if stage else "config.json names no stage"


def prompt_ids(enc, turns, prompt, template):
    """Token ids the model reads for `prompt` after the earlier turns [(user, answer), ...].
    Template: data.render_messages of the dialogue (the last user turn is the Instruction).
    Raw: a document start (EOS), then the turns and the prompt joined by newlines."""
    if template:
        messages = []
        for user, answer in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        text, _ = data.render_messages(messages + [{"role": "user", "content": prompt}])
        return enc.encode_ordinary(text)
    return [eos_id(enc)] + enc.encode_ordinary("\n".join([u + a for u, a in turns] + [prompt]))


def fit_history(enc, turns, prompt, template, block_size, max_new_tokens):
    """-> (turns kept, prompt ids): the oldest turns dropped until the prompt leaves room for
    min(max_new_tokens, block_size // 2) new tokens within the context."""
    room = min(max_new_tokens, block_size // 2)
    ids = prompt_ids(enc, turns, prompt, template)
    while turns and len(ids) + room > block_size:
        turns = turns[1:]
        ids = prompt_ids(enc, turns, prompt, template)
    if len(ids) >= block_size:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context of {block_size} leaves no room "
                        "for an answer; shorten it")
    return turns, ids


# ----------------------------------------------------------------------------- sampling

def sampling(args):
    """The keyword arguments of gpt.generate / stream that the options set."""
    greedy = args.temperature == 0
    return dict(temperature=1.0 if greedy else args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=greedy)


@torch.no_grad()
def answers(model, enc, ids, args, generator):
    """--num-samples texts for one prompt, sampled as one batch by gpt.generate (EOS removed)."""
    eos = eos_id(enc)
    outs = generate(model, [ids] * args.num_samples, args.max_new_tokens, eos_id=eos, pad_id=pad_id(enc),
                    generator=generator, **sampling(args))
    return [enc.decode([t for t in out if t != eos]) for out in outs]


def shown(prompt, text, template):
    """What the user reads: the answer after the template; the prompt and its continuation for raw text."""
    return text.strip() if template else prompt + text


def stream_answer(model, enc, ids, args, generator, template, out):
    """Write one answer to `out` token by token as gpt.generate samples them (whole UTF-8 characters only)
    -> its text. Ctrl-C stops it; the text so far is kept."""
    decoder, pieces, eos = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], eos_id(enc)

    def show(tokens):
        if tokens[0].item() == eos:
            return
        piece = decoder.decode(enc.decode_single_token_bytes(tokens[0].item()))
        if template and not "".join(pieces).strip():
            piece = piece.lstrip()  # the answer follows "Output:" after a space
        pieces.append(piece)
        out.write(piece)
        out.flush()
    try:
        generate(model, [ids], args.max_new_tokens, eos_id=eos, pad_id=pad_id(enc), generator=generator,
                 on_token=show, **sampling(args))
    except KeyboardInterrupt:
        out.write(" [stopped]")
    tail = decoder.decode(b"", final=True)  # a character cut off by --max-new-tokens or Ctrl-C
    text = "".join(pieces) + tail
    out.write(tail + "\n")
    out.flush()
    return text.strip() if template else text


# ----------------------------------------------------------------------------- the three ways to talk

def filtered(guard, prompt, texts):
    """The answers behind the guardrail: a flagged one becomes world.GUARD_REFUSAL."""
    if guard is None:
        return texts
    return [world.GUARD_REFUSAL if f else t for t, f in zip(texts, guard([prompt] * len(texts), texts))]


def one_prompt(model, enc, prompt, args, template, generator, out, guard=None):
    """--num-samples answers to one prompt, separated by a line of dashes (behind the guard, if any)."""
    _, ids = fit_history(enc, [], prompt, template, model.config.block_size, args.max_new_tokens)
    texts = [shown(prompt, t, template) for t in answers(model, enc, ids, args, generator)]
    texts = filtered(guard, enc.decode(ids), texts)
    out.write("\n---\n".join(texts) + "\n")
    out.flush()


def read_echoed(stream_in, out):
    """The next non-blank line of a file or pipe, echoed after "> " so the output reads as a transcript."""
    line = ""
    while not line.strip():
        line = stream_in.readline()
        if not line:
            raise EOFError
    out.write("> " + line.strip() + "\n")
    return line


def chat(model, enc, args, template, generator, read_line, out, guard=None):
    """The conversation: read a line, answer it streamed (whole, behind the guard, if any), keep it in the
    history. -> the turns."""
    turns = []
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            return turns
        if line == "/reset":
            turns = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            kept, ids = fit_history(enc, turns, line, template, model.config.block_size, args.max_new_tokens)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if len(kept) < len(turns):
            print(f"(dropped the {len(turns) - len(kept)} oldest turn(s) to fit the context)", file=sys.stderr)
        if guard is None:
            answer = stream_answer(model, enc, ids, args, generator, template, out)
        else:
            answer = filtered(guard, enc.decode(ids), [shown(line, answers(model, enc, ids, args, generator)[0], template)])[0]
            out.write(answer + "\n")
            out.flush()
        turns = kept + [(line, answer)]


# ----------------------------------------------------------------------------- main

def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint directory of this project or a Hugging Face GPT-2 directory")
    p.add_argument("prompt", nargs="?", default=None,
                   help="answer this once and exit (default: chat on a terminal, or one answer per line of stdin)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--template", dest="template", action="store_const", const=True, default=None,
                   help="render prompts in the instruction template (default: as the checkpoint's stage says)")
    g.add_argument("--raw", dest="template", action="store_const", const=False, help="continue the text as typed")
    p.add_argument("--chat", action="store_true", help="with stdin not a terminal: the lines are one conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="at most this many tokens per answer")
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="T; 0 = greedy, the argmax")
    p.add_argument("--top-k", type=nonneg_int, default=50, help="sample among the k likeliest tokens, 0 = all")
    p.add_argument("--top-p", type=positive_prob, default=0.95, help="nucleus: the smallest set of tokens reaching this probability, "
                   "1 = all")
    p.add_argument("--num-samples", type=positive_int, default=1, help="answers per prompt, not in the chat")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    p.add_argument("--guard", type=guard_spec, default=None, help="an output filter that answers a refusal instead "
                   "of a flagged answer: words (tagged insult words and the world's door codes) or rm:DIR (a reward "
                   "model's score below --guard-threshold)")
    p.add_argument("--guard-threshold", type=float, default=None, help="with --guard rm:DIR: flag scores below this "
                   "(default 0)")
    p.add_argument("--world-seed", type=int, default=1337, help="with --guard words: the world whose door codes it knows")
    return p


RULES = [
    Rule(lambda a: a.guard_threshold is not None and not (a.guard or "").startswith("rm:"),
         "--guard-threshold applies to --guard rm:DIR only", ("--guard", "words", "--guard-threshold", "1")),
]


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args, interactive=False):
    """Before the model is read: options that contradict each other, an empty prompt, a checkpoint path that
    names a file or a directory of checkpoints (the ranges of the numeric options are checked by their types)."""
    check_rules(args, RULES)
    if args.guard_threshold is None:
        args.guard_threshold = 0.0
    if interactive and args.num_samples > 1:
        raise UserError("--num-samples applies to a prompt on the command line or piped lines, not to the chat")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty; give the text to answer, or leave it out to chat")
    check_checkpoint_dir(args.checkpoint, "")


def main(argv=None, stdin=None, out=None):
    args = parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = args.prompt is None and (args.chat or stdin.isatty())
    check_args(args, interactive)
    device = check_device(args.device)
    model, enc, config = load_checkpoint(args.checkpoint, device, hint="python pretrain.py")
    model.eval()
    template, why = use_template(config, args.template)
    guard = make_guard(args.guard, enc, device, args.world_seed, args.guard_threshold)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    print(f"{args.checkpoint} ({why}, context {model.config.block_size} tokens): "
          f"{'instruction template' if template else 'raw text'}", file=sys.stderr)
    if args.prompt is not None:
        one_prompt(model, enc, args.prompt, args, template, generator, out, guard)
    elif interactive:
        if stdin.isatty():
            print("chat: /reset clears the history, Ctrl-C stops an answer, Ctrl-D quits", file=sys.stderr)
        read = functools.partial(input, "> ") if stdin.isatty() else functools.partial(read_echoed, stdin, out)
        chat(model, enc, args, template, generator, read, out, guard)
        if stdin.isatty():
            out.write("\n")  # Ctrl-D left the cursor after the prompt
    else:  # one answer (or --num-samples) per line, no history
        try:
            while True:
                one_prompt(model, enc, read_echoed(stdin, out).strip(), args, template, generator, out, guard)
        except EOFError:
            pass


if __name__ == "__main__":
    try:
        run_cli(main)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
