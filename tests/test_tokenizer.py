import json
import random

import pytest
import regex

from common import UserError
from tokenizer import (EOS, PAD, SPLIT_DIGITS_PATTERN, SPLIT_PATTERN, bpe_merges, eos_id, gpt2_tokenizer, load_tokenizer, pad_id, save_tokenizer,
                       tokenizer_fingerprint, train_tokenizer)


def test_merges_by_hand():
    # "aaab aaab ab": chunks "aaab" x1, " aaab" x1, " ab" x1. Pair counts: (a,a)=4, (a,b)=3, (' ',a)=2.
    merges = bpe_merges("aaab aaab ab", 2)
    a, b, sp = ord("a"), ord("b"), ord(" ")
    assert merges[0] == (a, a)           # most frequent pair first -> id 256
    # after merging: [256, a, b] x2 with spaces, [' ', a, b]: (a,b)=3 is now the most frequent
    assert merges[1] == (a, b)
    assert sp not in merges[1]


def test_special_tokens_are_the_last_two_ids(small_enc):
    assert eos_id(small_enc) == small_enc.n_vocab - 2
    assert pad_id(small_enc) == small_enc.n_vocab - 1
    assert small_enc.n_vocab == 300


def test_round_trip_arbitrary_unicode_and_bytes(small_enc):
    rng = random.Random(0)
    samples = ["", " ", "\n\n\t", "héllo wörld", "日本語のテキスト", "emoji 🚀🔥 mixed", "\x00\x01\x7f",
               "Instruction: x\nOutput: 42", "<|endoftext|> is plain text here"]
    samples += ["".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(50)) for _ in range(20)]
    samples += [bytes(rng.randrange(256) for _ in range(64)).decode("latin-1") for _ in range(20)]
    for s in samples:
        ids = small_enc.encode_ordinary(s)
        assert small_enc.decode(ids) == s
    # any byte string: decode_bytes of its byte tokens is exact, and BPE output decodes back to the same bytes
    raw = bytes(range(256))
    assert small_enc.decode_bytes(list(raw)) == raw


def test_user_text_never_becomes_a_special_token(small_enc):
    ids = small_enc.encode_ordinary("a <|endoftext|> b <|pad|>")
    assert eos_id(small_enc) not in ids and pad_id(small_enc) not in ids


def test_no_merge_crosses_a_special_token():
    # the corpus glues documents with <|endoftext|>: no learned token may contain part of it and a word
    text = ("hello<|endoftext|>world" * 50) + " hello world"
    enc = train_tokenizer(text, 300)
    for t in range(enc.n_vocab - 2):
        tok = enc.decode_single_token_bytes(t)
        assert b"<|" not in tok or tok == b"<|"
        assert not (b"o<" in tok or b">w" in tok)
    ids = enc.encode("hello<|endoftext|>world", allowed_special={EOS})
    i = ids.index(eos_id(enc))
    assert enc.decode(ids[:i]) == "hello" and enc.decode(ids[i + 1:]) == "world"


def test_save_load_identical_and_json_only(tmp_path, small_enc, small_text):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(small_enc, path)
    spec = json.loads(path.read_text())
    assert spec["special_tokens"] == {EOS: 298, PAD: 299}
    enc2 = load_tokenizer(path)
    assert enc2.encode_ordinary(small_text) == small_enc.encode_ordinary(small_text)
    assert tokenizer_fingerprint(enc2) == tokenizer_fingerprint(small_enc)


def test_same_text_same_tokenizer_and_different_text_different_fingerprint(small_text):
    a, b = train_tokenizer(small_text, 280), train_tokenizer(small_text, 280)
    assert a._merges == b._merges and tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    c = train_tokenizer(small_text[: len(small_text) // 3], 280)
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)


@pytest.mark.parametrize("content", ["not json", '{"type": "bpe", "merges": [[1, 999]]}', '{"merges": []}'])
def test_bad_tokenizer_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer(path)


def test_gpt2_offline_gives_a_clear_error_or_works(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: never downloads
    with pytest.raises(UserError, match="vocab.json and merges.txt"):
        gpt2_tokenizer()


def test_gpt2_from_hf_files(tmp_path):
    # a miniature file pair in the HF layout: bytes use GPT-2's printable-byte alphabet ('Ġ' = space)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet, n = {}, 0
    for b in range(256):
        alphabet[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    vocab = {alphabet[b]: i for i, b in enumerate(printable + [b for b in range(256) if b not in printable])}
    vocab["Ġa"] = 256
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ a\n")
    enc = gpt2_tokenizer(str(tmp_path))
    assert enc.encode_ordinary(" a") == [256] and eos_id(enc) == 257 and pad_id(enc) == eos_id(enc)
    assert enc.decode(enc.encode_ordinary("é ab\n")) == "é ab\n"


@pytest.fixture(scope="module")
def text_with_numbers(small_text):
    return small_text + "\n\n" + " ".join(f"{a} + {b} = {a + b}" for a in range(0, 400, 7) for b in (5, 58, 347))


def test_default_tokenizer_is_unchanged_by_the_digit_option(text_with_numbers):
    # the fingerprint the code had before --split-digits existed: same merges, same pattern, same JSON
    enc = train_tokenizer(text_with_numbers, 300)
    assert tokenizer_fingerprint(enc) == "973fc5ddddb40724"
    assert regex.findall(enc._pat_str, "x 12345") == ["x", " ", "123", "45"]  # numbers still chunk by three
    assert regex.findall(SPLIT_DIGITS_PATTERN, "x 12345") == ["x", " ", "1", "2", "3", "4", "5"]


def test_split_digits_every_digit_its_own_token_and_round_trip(tmp_path, text_with_numbers):
    enc = train_tokenizer(text_with_numbers, 300, split_digits=True)
    assert enc._pat_str == SPLIT_DIGITS_PATTERN != SPLIT_PATTERN
    for t in range(enc.n_vocab - 2):  # no learned token holds a digit next to anything else
        tok = enc.decode_single_token_bytes(t)
        assert not any(chr(c).isdigit() for c in tok) or len(tok) == 1
    s = "What is 347 + 58? 7 + 8 = 15, write 5 carry 1. The answer is 405."
    ids = enc.encode_ordinary(s)
    assert enc.decode(ids) == s
    assert [enc.decode([i]) for i in enc.encode_ordinary("347 + 1058")][:3] == ["3", "4", "7"]
    assert sum(enc.decode([i]).isdigit() for i in ids) == sum(c.isdigit() for c in s)  # one token per digit
    path = tmp_path / "tokenizer.json"
    save_tokenizer(enc, path)  # the checkpoint carries the option: the loaded tokenizer splits digits too
    assert json.loads(path.read_text())["pattern"] == SPLIT_DIGITS_PATTERN
    enc2 = load_tokenizer(path)
    assert enc2.encode_ordinary(s) == ids and tokenizer_fingerprint(enc2) == tokenizer_fingerprint(enc)
    assert tokenizer_fingerprint(enc) != tokenizer_fingerprint(train_tokenizer(text_with_numbers, 300))


def test_unknown_split_pattern_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"type": "bpe", "merges": [], "pattern": r"\w+"}))
    with pytest.raises(UserError, match="pattern"):
        load_tokenizer(path)
