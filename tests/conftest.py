import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


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
