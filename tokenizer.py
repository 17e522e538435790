"""Byte-level BPE, trained from scratch on the corpus, served as a tiktoken.Encoding.

How it works (the GPT-2 / GPT-4 recipe):
  1. A regex splits text into chunks (words with their leading space, numbers of at most three
     digits, punctuation runs, whitespace), so a merge never crosses a chunk boundary. With
     split_digits (pretrain.py --split-digits, as LLaMA does) every digit is a chunk of its own, so
     every number is written digit by digit and no merge ever makes a multi-digit token.
  2. Every chunk starts as its UTF-8 bytes: tokens 0..255 are the 256 bytes, so any string
     (any language, emoji, control characters) can be encoded and decoded exactly.
  3. Training repeats: count adjacent token pairs over all chunks (weighted by how often the
     chunk occurs), merge the most frequent pair into a new token. Merge i gets id 256 + i.
  4. Two special tokens take the last two ids: <|endoftext|> (EOS, ends every document and
     every completion) and <|pad|> (fills batches; never trained on, always masked).

Encoding with the result is tiktoken's job (fast, in Rust): a tiktoken.Encoding applies merges
in rank order, which is the order they were learned. User text is always encoded with
`enc.encode_ordinary`, so a literal "<|endoftext|>" typed in data is plain text, never EOS.

The tokenizer is saved as JSON (the merges as pairs of ids), never pickled.
`gpt2_tokenizer()` gives OpenAI's GPT-2 encoding for imported GPT-2 weights.

    python tokenizer.py    # trains a 4096-token BPE on the default world and shows how it splits two lines
"""
import collections
import hashlib
import json
import os
import shutil
import tempfile
import time

import regex
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

import world
from common import ArgumentParser, UserError, atomic_write_json, run_cli

# GPT-4's split pattern (cl100k): case-insensitive contractions, letters with one leading
# non-letter, numbers of 1-3 digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# The same pattern with one digit per chunk: "347" is three tokens, not one.
SPLIT_DIGITS_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PATTERNS = (SPLIT_PATTERN, SPLIT_DIGITS_PATTERN)
EOS, PAD = "<|endoftext|>", "<|pad|>"


def bpe_merges(text, n_merges, pattern=SPLIT_PATTERN):
    """Learn n_merges BPE merges on text. Returns [(left_id, right_id), ...]; merge i makes id 256+i.

    Chunk counts are collected once; pair counts are then updated incrementally (only the chunks
    that contain the merged pair change), so training on a few MB takes seconds in pure Python.
    Ties between equally frequent pairs go to the smallest (left, right) ids: deterministic."""
    for special in (EOS, PAD):  # special tokens are document separators, never merge material
        text = text.replace(special, "\n")
    chunk_counts = collections.Counter(regex.findall(pattern, text))
    words = [list(w.encode("utf-8")) for w in chunk_counts]
    freq = list(chunk_counts.values())
    pairs = collections.Counter()          # (a, b) -> weighted count over all chunks
    where = collections.defaultdict(set)   # (a, b) -> indices of chunks containing it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    merges = []
    for new_id in range(256, 256 + n_merges):
        if not pairs:
            break  # every chunk is a single token: nothing left to merge
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i in sorted(where.pop(best)):
            w, f = words[i], freq[i]
            for pair in zip(w, w[1:]):  # remove this chunk's old pairs ...
                pairs[pair] -= f
                if pairs[pair] <= 0:
                    del pairs[pair]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):  # ... and add its new ones
                pairs[pair] += f
                where[pair].add(i)
        pairs.pop(best, None)
    return merges


def encoding_from_merges(merges, name="bpe", pattern=SPLIT_PATTERN):
    """tiktoken.Encoding whose ranks are: byte b -> b, merge i -> 256 + i; then EOS, PAD; chunks split by pattern."""
    vocab = [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    ranks = {tok: i for i, tok in enumerate(vocab)}
    if len(ranks) != len(vocab):
        raise UserError(f"tokenizer {name!r}: two merges make the same token; the file is corrupt")
    n = len(vocab)
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOS: n, PAD: n + 1}, explicit_n_vocab=n + 2)


def train_tokenizer(text, vocab_size=4096, split_digits=False):
    """Byte-level BPE with vocab_size tokens in all: 256 bytes + merges + EOS + PAD. split_digits: one
    token per digit (the chunks of SPLIT_DIGITS_PATTERN)."""
    if vocab_size < 258:
        raise UserError(f"--vocab-size must be at least 258 (256 bytes + 2 special tokens), not {vocab_size}")
    pattern = SPLIT_DIGITS_PATTERN if split_digits else SPLIT_PATTERN
    merges = bpe_merges(text, vocab_size - 258, pattern)
    enc = encoding_from_merges(merges, name=f"bpe{256 + len(merges) + 2}", pattern=pattern)
    enc._merges = merges  # kept for save_tokenizer
    return enc


def eos_id(enc):
    return enc.eot_token


def pad_id(enc):
    """Our tokenizers have a distinct <|pad|>; GPT-2's has none, so padding uses EOS (always masked)."""
    return enc._special_tokens.get(PAD, enc.eot_token)


def tokenizer_json(enc):
    if hasattr(enc, "_merges"):
        return {"type": "bpe", "name": enc.name, "pattern": enc._pat_str,
                "merges": [list(m) for m in enc._merges], "special_tokens": {EOS: enc.n_vocab - 2, PAD: enc.n_vocab - 1}}
    if enc.name == "gpt2":
        return {"type": "tiktoken", "name": "gpt2"}
    raise UserError(f"cannot save tokenizer {enc.name!r}: only trained BPE tokenizers and gpt2 can be saved")


def tokenizer_fingerprint(enc):
    """sha256 of the tokenizer's JSON: two checkpoints can be combined only if these agree."""
    blob = json.dumps(tokenizer_json(enc), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_tokenizer(enc, path):
    atomic_write_json(tokenizer_json(enc), path)


def load_tokenizer(path):
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no tokenizer file (a checkpoint directory holds tokenizer.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid tokenizer JSON file ({e})") from None
    if not isinstance(spec, dict) or spec.get("type") not in ("bpe", "tiktoken"):
        raise UserError(f"{path}: not a tokenizer file (expected \"type\": \"bpe\" or \"tiktoken\")")
    if spec["type"] == "tiktoken":
        if spec.get("name") != "gpt2":
            raise UserError(f"{path}: unknown tiktoken encoding {spec.get('name')!r} (only gpt2 is supported)")
        return gpt2_tokenizer(os.path.dirname(path))
    merges = spec.get("merges")
    ok = isinstance(merges, list) and all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(t, int) and 0 <= t < 256 + i for t in m)
        for i, m in enumerate(merges))
    if not ok:
        raise UserError(f"{path}: 'merges' must be a list of [left_id, right_id] pairs of earlier tokens")
    pattern = spec.get("pattern", SPLIT_PATTERN)
    if pattern not in PATTERNS:
        raise UserError(f"{path}: unknown split 'pattern' (this version reads numbers of 1-3 digits or one digit "
                        "per chunk: tokenizer.SPLIT_PATTERN or SPLIT_DIGITS_PATTERN)")
    enc = encoding_from_merges([tuple(m) for m in merges], name=spec.get("name", "bpe"), pattern=pattern)
    enc._merges = [tuple(m) for m in merges]
    return enc


GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


def gpt2_tokenizer(model_dir=None):
    """OpenAI's GPT-2 BPE (50257 tokens, EOS 50256, no PAD: padding uses EOS, always masked).

    Taken from model_dir when it holds the Hugging Face files vocab.json + merges.txt (the same
    data as tiktoken's encoder.json + vocab.bpe), else from tiktoken's local cache. Never downloads:
    without either, a clear error says how to get the files."""
    if model_dir and all(os.path.exists(os.path.join(model_dir, f)) for f in ("vocab.json", "merges.txt")):
        files = tuple(os.path.join(model_dir, f) for f in ("merges.txt", "vocab.json"))
        # tiktoken caches local files by path; passing their hashes makes a changed file be read again
        hashes = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(*files, *hashes)
        except (AssertionError, KeyError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{model_dir}: vocab.json and merges.txt are not a matching GPT-2 byte-level BPE "
                            f"({type(e).__name__}); take both files from the same Hugging Face repository") from None
        enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                special_tokens={EOS: len(ranks)})  # 50256 for GPT-2
        enc._hf_files = files  # gpt.save_checkpoint copies them beside every checkpoint made from this model
        return enc
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cached = [os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in GPT2_URLS]
    if not all(cached):
        raise UserError("the gpt2 tokenizer files are not available offline: put vocab.json and merges.txt "
                        "(from the Hugging Face gpt2 repository) next to the weights, or run "
                        "`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once with network "
                        f"(it caches them in {cache})")
    return tiktoken.get_encoding("gpt2")

def copy_gpt2_vocab(enc, out_dir):
    """Copy the vocab.json + merges.txt a gpt2 tokenizer was read from (tokenizer.gpt2_tokenizer sets
    enc._hf_files) into out_dir, so the checkpoint stays loadable offline. Nothing to do otherwise."""
    for src in getattr(enc, "_hf_files", ()):
        dst = os.path.join(out_dir, os.path.basename(src))
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)


def describe(enc, text):
    """Show how text splits into tokens: 'The| flag| of| Bel|wick'."""
    return "|".join(enc.decode_single_token_bytes(t).decode("utf-8", "replace") for t in enc.encode_ordinary(text))


def build_parser():
    return ArgumentParser(description=__doc__)


def main(argv=None):
    build_parser().parse_args(argv)
    w = world.make_world()
    text = "\n\n".join(world.pretrain_docs(w))
    t0 = time.time()
    enc = train_tokenizer(text, 4096)
    print(f"trained {enc.n_vocab} tokens on {len(text):,} characters in {time.time() - t0:.1f}s; "
          f"{len(text) / len(enc.encode_ordinary(text)):.2f} characters per token")
    for s in ("The flag of Belwick is green.", "Instruction: Answer the question.\nOutput: 12 + 35 = 47"):
        print(describe(enc, s))


if __name__ == "__main__":
    run_cli(main)
