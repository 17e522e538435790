"""What every stage feeds on: the one instruction template, tokens and batches with their loss
masks, and loaders for your own files. The default world's data is in world.py.

The template (THE one instruction template of the project)
------------------------------------------------------------
  prompt     = "Instruction: {instruction}\\nInput: {input}\\nOutput:"  (no Input line if input is empty)
  completion = " {output}", then the EOS token id.

Tokens and batches
------------------
completion_batch pads prompt+completion rows and marks the loss targets: only completion tokens
(and the EOS) count, never the prompt or the padding. SFT, the reward model, DPO, PPO and GRPO all
take their log pi(y | x) from it. tokenize_corpus / get_batch serve pre-training windows;
step_indices is the one resumable batch order.

Your own data
-------------
read_text (.txt), read_records (.jsonl/.json), load_sft_examples (Alpaca, messages, prompt/completion),
load_preference_pairs (prompt/chosen/rejected, Anthropic HH), load_prompts. Bad input raises
UserError with one line: what, where (path:line), how to fix.
"""

import hashlib
import json
import os
import re

import numpy as np
import torch

from common import UserError, atomic_write, signals_deferred


# ----------------------------------------------------------------------------- the template

def format_prompt(instruction, input=""):
    """THE instruction template: "Instruction: {instruction}\\nInput: {input}\\nOutput:" (no Input line if empty)."""
    return f"Instruction: {instruction}\nInput: {input}\nOutput:" if input else f"Instruction: {instruction}\nOutput:"


def format_completion(output):
    return " " + output


def render_messages(messages, where="messages"):
    """Chat messages -> (prompt, completion) in the one template. System messages, then the last user
    turn, form the Instruction; earlier turns become the Input, one "User: ..." / "Assistant: ..." line
    each; a final assistant turn is the completion (" " + content), else the completion is ""."""
    ok = lambda m: isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and \
        isinstance(m.get("content"), str)
    if not isinstance(messages, list) or not messages or not all(map(ok, messages)):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\": system|user|assistant, "
                        f"\"content\": text}}")
    completion = ""
    if messages[-1]["role"] == "assistant":
        completion, messages = format_completion(messages[-1]["content"]), messages[:-1]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise UserError(f"{where}: the turn before the answer must be a user message")
    instruction = " ".join([m["content"] for m in messages if m["role"] == "system"] + [turns[-1]["content"]])
    history = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns[:-1])
    return format_prompt(instruction, history), completion


# ----------------------------------------------------------------------------- tokens and batches

def encode_example(enc, prompt, completion, block_size, where="example"):
    """(prompt_ids, completion_ids + [EOS]); special-token strings in the text stay plain text."""
    p, c = enc.encode_ordinary(prompt), enc.encode_ordinary(completion) + [enc.eot_token]
    if not p:
        raise UserError(f"{where}: the prompt is empty; every example needs a prompt")
    if len(p) + len(c) > block_size:
        raise UserError(f"{where}: prompt + completion is {len(p) + len(c)} tokens, longer than the context of "
                        f"{block_size}; shorten it, drop it, or use a model with a longer context")
    return p, c


def completion_batch(prompts, completions, pad_id, side="right"):
    """Pad prompt+completion rows into one batch. targets[b, t] = input_ids[b, t+1] where token t+1 is a
    completion token, else -1 (prompt, padding, last position), so the sum of token log-probs of a row is
    log pi(y | x). position_ids = cumsum(mask) - 1 (clamped at 0): left padding changes nothing."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    targets = torch.full((B, T), -1, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (row, p) in enumerate(zip(rows, prompts)):
        o = T - len(row) if side == "left" else 0
        ids[b, o:o + len(row)] = torch.tensor(row)
        mask[b, o:o + len(row)] = True
        targets[b, o + len(p) - 1:o + len(row) - 1] = ids[b, o + len(p):o + len(row)]
        last[b] = o + len(row) - 1
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "targets": targets,
            "last_index": last}


def encode_documents(docs, enc):
    """Documents -> one flat token array EOS d1 EOS d2 ... dn EOS (int64): how every stage sees text."""
    ids = [enc.eot_token]
    with signals_deferred():   # a Ctrl-C inside tiktoken's thread pool would hang the process
        batch = enc.encode_ordinary_batch(docs)
    for d in batch:
        ids += d + [enc.eot_token]
    return np.array(ids, dtype=np.int64)


def tokenize_corpus(docs, enc, path, fingerprint=None):
    """Encode documents as one flat token array EOS d1 EOS d2 ... dn EOS, cached at `path` (uint16, or
    uint32 for vocabularies over 65536 ids) with `path`.json holding its meta; a cache whose text hash,
    vocabulary size and tokenizer fingerprint match is reused. Returns a read-only np.memmap."""
    docs = [docs] if isinstance(docs, str) else docs
    meta = {"sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest(), "n_docs": len(docs),
            "n_vocab": enc.n_vocab, "fingerprint": fingerprint or f"{enc.name}:{enc.n_vocab}",
            "dtype": "uint16" if enc.n_vocab <= 65536 else "uint32"}
    try:
        old = json.load(open(path + ".json"))
        size = old["count"] * np.dtype(meta["dtype"]).itemsize
        if {k: old.get(k) for k in meta} == meta and os.path.getsize(path) == size:
            return load_tokens(path)
    except (OSError, ValueError, KeyError):
        pass
    ids = encode_documents(docs, enc)
    if len(ids) <= 1:
        raise UserError(f"{path}: nothing to tokenize; the documents are empty")
    atomic_write(path, ids.astype(meta["dtype"]).tobytes())
    atomic_write(path + ".json", json.dumps({**meta, "count": len(ids)}))
    return load_tokens(path)


def load_tokens(path):
    try:
        meta = json.load(open(path + ".json"))
        return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["count"],))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: no readable token cache ({e}); make it with data.tokenize_corpus") from None


def get_batch(tokens, batch_size, block_size, seed, step, micro):
    """Random windows x = tokens[i:i+T], y = tokens[i+1:i+T+1], i drawn from default_rng([seed, step, micro]):
    a pure function of its arguments, so --resume and every DDP rank/micro-step are exact."""
    n = len(tokens)
    if n <= block_size:
        raise UserError(f"only {n} tokens of data, need more than block_size={block_size}; "
                        f"add text or lower --block-size")
    ix = np.random.default_rng([seed, step, micro]).integers(0, n - block_size, size=batch_size)
    x = np.stack([np.asarray(tokens[i:i + block_size], dtype=np.int64) for i in ix])
    y = np.stack([np.asarray(tokens[i + 1:i + 1 + block_size], dtype=np.int64) for i in ix])
    return torch.from_numpy(x), torch.from_numpy(y)


def step_indices(n, batch, seed, step):
    """Indices of the examples in optimizer step `step`'s batch: consecutive slices of one shuffled
    permutation per epoch (default_rng([seed, epoch])). A pure function of its arguments, so --resume
    continues with the very same batches. SFT, reward and DPO all draw their batches with it."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * batch:(k + 1) * batch].tolist()


# ----------------------------------------------------------------------------- documents

def split_documents(docs, val_fraction=0.05):
    """-> (train, val): the last val_fraction of the documents (at least one) are held out; a single
    document is cut at 1 - val_fraction of its length. Pre-training, SFT's forgetting check and the
    report all use this split, so "validation loss on pre-training text" means one thing."""
    if not docs:
        raise UserError("no documents to split")
    if len(docs) < 2:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    n_val = max(1, int(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


# ----------------------------------------------------------------------------- loaders for your own files

def read_utf8(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; check the path")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset "
                        f"{e.start}); re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise UserError(f"{path}: the file is empty; put text in it or leave it out")
    return text


def read_text(paths, split_blank_lines=False):
    """Plain-text documents: each .txt file (or each .txt in a given directory) is one document, or,
    with split_blank_lines, every run of text between blank lines is one."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        raise UserError("no text files given; name one or more .txt files")
    docs = []
    for p in paths:
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt")) if os.path.isdir(p) else [p]
        if not files:
            raise UserError(f"{p}: the directory has no .txt files")
        for f in files:
            text = read_utf8(f).strip()
            docs += [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()] if split_blank_lines else [text]
    return docs


def records_with_lines(path):
    """[(where, record)]: where = "path:line" of the record, for error messages."""
    text = read_utf8(path)
    out = []
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: malformed JSON ({e.msg}, column {e.colno}); "
                                    f"each line must be one JSON object") from None
    elif path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: a .json file must hold a list of objects; for one object per line use .jsonl")
        pos, line, dec = text.index("[") + 1, 1, json.JSONDecoder()
        for item in items:  # walk the array again to know each item's line
            start = pos
            while text[pos] in " \t\n\r,":
                pos += 1
            line += text.count("\n", start, pos)
            out.append((f"{path}:{line}", item))
            end = dec.raw_decode(text, pos)[1]
            line, pos = line + text.count("\n", pos, end), end
    else:
        raise UserError(f"{path}: unknown data format; use .jsonl (one JSON object per line) or .json (a list)")
    for where, r in out:
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(r).__name__}")
    if not out:
        raise UserError(f"{path}: no records found")
    return out


def read_records(path):
    """Records of a .jsonl (one object per line, blank lines skipped) or .json (a list of objects) file."""
    return [r for _, r in records_with_lines(path)]


def field(r, key, where, optional=False):
    v = r.get(key)
    if v is None and optional:
        return ""
    if v is None:
        raise UserError(f"{where}: missing field '{key}' (the record has {', '.join(sorted(r)) or 'no fields'})")
    if not isinstance(v, str):
        raise UserError(f"{where}: field '{key}' must be a string, not {type(v).__name__}")
    if not optional and not v.strip():
        raise UserError(f"{where}: field '{key}' is empty; fill it or drop the record")
    return v


def load_sft_examples(path, with_where=False):
    """[(prompt, completion)] from Alpaca records (instruction, optional input, output), chat records
    ("messages", rendered by render_messages) or raw prompt/completion records (used verbatim).
    with_where=True gives (prompt, completion, "path:line") so later errors can name the record."""
    out = []
    for where, r in records_with_lines(path):
        if "messages" in r:
            prompt, completion = render_messages(r["messages"], where)
            if not completion.strip():
                raise UserError(f"{where}: the last message must be a non-empty assistant answer")
        elif "instruction" in r or "output" in r:
            prompt = format_prompt(field(r, "instruction", where), field(r, "input", where, optional=True))
            completion = format_completion(field(r, "output", where))
        elif "prompt" in r and "completion" in r:
            prompt, completion = field(r, "prompt", where), field(r, "completion", where)
        else:
            raise UserError(f"{where}: needs 'instruction' and 'output' (Alpaca), 'messages' (chat) or 'prompt' and "
                            f"'completion'; found {', '.join(sorted(r)) or 'no fields'}")
        out.append((prompt, completion, where) if with_where else (prompt, completion))
    return out


def split_hh(chosen, rejected, where):
    """Anthropic-HH pairs embed the prompt in both texts: it ends at the last "\\n\\nAssistant:" of their
    common prefix; what follows is each answer."""
    cut = os.path.commonprefix([chosen, rejected]).rfind("\n\nAssistant:")
    if cut < 0:
        raise UserError(f"{where}: no 'prompt' field and no shared '\\n\\nAssistant:' turn in chosen and rejected; "
                        f"add a 'prompt' field")
    cut += len("\n\nAssistant:")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def load_preference_pairs(path, with_where=False):
    """[{"prompt", "chosen", "rejected"[, "score_chosen", "score_rejected"]}] from prompt/chosen/rejected
    records, Anthropic-HH records (chosen/rejected only, prompt embedded) or chosen/rejected as
    message lists (the prompt is the rendering of the shared turns). with_where: each pair also has
    "where", the "path:line" its record came from, for later error messages."""
    out = []
    for where, r in records_with_lines(path):
        if isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list):
            (prompt, chosen), (prompt_r, rejected) = (render_messages(r[k], where) for k in ("chosen", "rejected"))
            if prompt != prompt_r:
                raise UserError(f"{where}: chosen and rejected conversations differ before the last answer")
        elif "prompt" in r:
            prompt, chosen, rejected = (field(r, k, where) for k in ("prompt", "chosen", "rejected"))
        else:
            prompt, chosen, rejected = split_hh(field(r, "chosen", where), field(r, "rejected", where), where)
        if not chosen.strip() or not rejected.strip():
            raise UserError(f"{where}: chosen and rejected answers must both be non-empty")
        if chosen == rejected:
            raise UserError(f"{where}: chosen and rejected are identical; a pair needs two different answers")
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        for k in ("score_chosen", "score_rejected"):
            if k in r:
                v = r[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                    raise UserError(f"{where}: '{k}' must be a number (finite), not {v}")
                pair[k] = float(r[k])
        if with_where:
            pair["where"] = where
        out.append(pair)
    return out


def load_prompts(path):
    """Prompts from records with 'prompt', Alpaca fields (-> format_prompt) or 'messages' (-> render_messages)."""
    out = []
    for where, r in records_with_lines(path):
        if "prompt" in r:
            out.append(field(r, "prompt", where))
        elif "messages" in r:
            out.append(render_messages(r["messages"], where)[0])
        elif "instruction" in r:
            out.append(format_prompt(field(r, "instruction", where), field(r, "input", where, optional=True)))
        else:
            raise UserError(f"{where}: needs a 'prompt', an 'instruction' or 'messages'")
    return out
