"""The n-gram and semantic measures of evals.py by hand: ROUGE-N, BLEU on short candidates (and against NLTK
when it is installed), BERTScore P/R/F1 on hand-set embeddings with and without idf, baseline rescaling, and the
hidden-layer embeddings of a checkpoint."""

import math

import pytest
import torch

import evals
from common import UserError
from gpt import GPT, GPTConfig


def test_rouge_1_and_2_by_hand():
    # "the cat sat on the mat" vs "the cat lay on the mat": unigrams 5 of 6 shared (the x2, cat, on, mat)
    assert evals.rouge_n("the cat sat on the mat", "the cat lay on the mat", 1) == pytest.approx(5 / 6)
    # bigrams: (the cat), (on the), (the mat) shared of 5 each: P = R = 3/5
    assert evals.rouge_n("the cat sat on the mat", "the cat lay on the mat", 2) == pytest.approx(3 / 5)
    # clipped counts: candidate "a a a b" vs "a b c": m1 = min(3,1) + 1 = 2, P = 2/4, R = 2/3, F = 4/7
    assert evals.rouge_n("a a a b", "a b c", 1) == pytest.approx(4 / 7)
    # bigrams (a a) x2, (a b) vs (a b), (b c): m = 1, P = 1/3, R = 1/2, F = 2/5
    assert evals.rouge_n("a a a b", "a b c", 2) == pytest.approx(2 / 5)
    assert evals.rouge_n("a", "a b", 2) == 0.0 and evals.rouge_n("x y", "a b", 1) == 0.0


def test_bleu_on_candidates_shorter_than_max_n():
    # 1 word, right: p1 = 1, p2..p4 = (0+1)/(1+1) (no n-gram: 0/1, smoothed); BP = exp(1 - 3/1)
    assert evals.bleu("cat", "the cat sat") == pytest.approx(math.exp(-2) * (0.5 ** 3) ** 0.25)
    # 3 words, all right: p1 = p2 = p3 = 1, p4 = 1/2; BP = exp(1 - 4/3)
    assert evals.bleu("the cat sat", "the cat sat down") == pytest.approx(math.exp(1 - 4 / 3) * 0.5 ** 0.25)


@pytest.mark.parametrize("cand,ref", [("the cat", "the cat sat on the mat"), ("cat", "the cat sat"),
                                      ("the cat the cat", "the cat sat"), ("a b c d e f", "a b c x e f g"),
                                      ("the kettle is great .", "the kettle is not great , sadly ."), ("dog", "cat")])
def test_bleu_agrees_with_nltk_method2(cand, ref):
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    m2 = bleu_score.SmoothingFunction().method2
    want = bleu_score.sentence_bleu([evals.words(ref)], evals.words(cand), smoothing_function=m2)
    assert evals.bleu(cand, ref) == pytest.approx(want, abs=1e-12)


# The 3x2 example: reference x = 3 tokens, candidate x^ = 2 tokens, hand-set unit vectors in 2-D.
REF = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
CAND = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
# S = x . x^: rows (reference) [1, .8], [0, .6], [.6, .96]


def test_bertscore_by_hand():
    P, R, F = evals.bertscore(CAND, REF)
    # R: each reference token's best match: 1, .6, .96 -> 2.56/3; P: each candidate token's: 1, .96 -> 1.96/2
    assert R == pytest.approx(2.56 / 3) and P == pytest.approx(1.96 / 2)
    assert F == pytest.approx(2 * P * R / (P + R))
    # cosine, not dot product: scaling a vector changes nothing
    assert evals.bertscore(CAND * 3, REF * torch.tensor([[2.0], [5.0], [0.5]])) == pytest.approx((P, R, F))


def test_bertscore_with_idf_by_hand():
    P, R, F = evals.bertscore(CAND, REF, cand_weights=[1.0, 3.0], ref_weights=[2.0, 1.0, 1.0])
    assert R == pytest.approx((2 * 1 + 1 * 0.6 + 1 * 0.96) / 4)
    assert P == pytest.approx((1 * 1 + 3 * 0.96) / 4)
    assert F == pytest.approx(2 * P * R / (P + R))


def test_idf_weights_and_baseline_rescaling():
    idf = evals.idf_weights([[1, 2, 2], [2, 3], [2]])
    # M = 3: token 2 in all 3 texts -> log(4/4) = 0; token 1 in one -> log(4/2); unseen -> log(4)
    assert idf(2) == 0.0 and idf(1) == pytest.approx(math.log(2)) and idf(9) == pytest.approx(math.log(4))
    assert evals.rescale_with_baseline(0.9, 0.8) == pytest.approx(0.5)
    assert evals.rescale_with_baseline(0.8, 0.8) == 0.0 and evals.rescale_with_baseline(1.0, 0.8) == pytest.approx(1.0)
    table = {"a": REF, "b": CAND}
    assert evals.bertscore_baseline(table.get, ["a", "b"], n_pairs=4) == pytest.approx(evals.bertscore(CAND, REF)[2])


def test_layer_embeddings_of_a_checkpoint(small_enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_enc.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    ids, h0 = evals.layer_embeddings(model, small_enc, "the cat sat", 0)
    assert ids == small_enc.encode_ordinary("the cat sat") and h0.shape == (len(ids), 16)
    want0 = model.transformer.wte.weight[ids] + model.transformer.wpe.weight[1:len(ids) + 1]  # after EOS at 0
    assert torch.allclose(h0, want0.detach())
    # causal: the vectors of a prefix do not depend on what follows
    _, h2 = evals.layer_embeddings(model, small_enc, "the cat sat", 2)
    _, h2_longer = evals.layer_embeddings(model, small_enc, "the cat sat on the mat", 2)
    assert torch.allclose(h2, h2_longer[:len(ids)], atol=1e-6)
    assert not torch.allclose(h2, h0)
    with pytest.raises(UserError, match="layer 3 out of range"):
        evals.layer_embeddings(model, small_enc, "x", 3)
