"""Model identity (models/identity.py): tokenizer digest, weights signature and its tolerance, and reading the
weights SGLang's loaded model holds (sglang_compat.layer0_kv_weights)."""

from __future__ import annotations

import random

import pytest
import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.models.identity import (
    PROBES,
    WEIGHTS_TOLERANCE,
    ModelIdentityError,
    compare_weights,
    head_signatures,
    hf_model_signature,
    signature_difference,
    signature_problem,
    tokenizer_digest,
    weights_signature,
)
from kvtc_sglang.testing.tiny_models import WORDS, sglang_like_model, tiny_llama, tiny_tokenizer

D = 16


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=0), tiny_llama(seed=1)


def test_tokenizer_digest_tells_vocabularies_apart():
    assert tokenizer_digest(tiny_tokenizer()) == tokenizer_digest(tiny_tokenizer())
    shuffled = list(WORDS)
    random.Random(1).shuffle(shuffled)
    assert tokenizer_digest(tiny_tokenizer(tuple(shuffled))) != tokenizer_digest(tiny_tokenizer())
    with pytest.raises(ModelIdentityError, match="no get_vocab"):
        tokenizer_digest(object())


def test_signature_survives_storage_rounding_and_separates_checkpoints(models):
    a, b = models
    card = hf_model_signature(a, D)
    assert len(card["k"]) == 2 and all(len(row) == PROBES for row in card["k"] + card["v"])
    assert signature_problem(card) is None
    for dtype, bound in ((torch.bfloat16, 0.01), (torch.float16, 0.002)):
        live = compat.layer0_kv_weights(sglang_like_model(a, dtype=dtype))
        diff = signature_difference(card, weights_signature(live["k"], live["v"], live["head_dim"]))
        assert diff < bound < WEIGHTS_TOLERANCE
    other = signature_difference(card, hf_model_signature(b, D))
    assert other > 0.5
    assert compare_weights(card, hf_model_signature(b, D)).matches is False
    assert compare_weights(card, hf_model_signature(a, D)).matches is True


def test_a_rank_compares_its_own_heads_with_the_cards_entries(models):
    a, _ = models
    card = hf_model_signature(a, D)
    for rank in range(2):
        live = compat.layer0_kv_weights(sglang_like_model(a, tp_size=2, tp_rank=rank))
        assert live["first_head"] == rank and live["k"].shape == (D, 64)
        sig = weights_signature(live["k"], live["v"], D, first_head=live["first_head"])
        assert sig["k"][0] == pytest.approx(card["k"][rank], rel=1e-5) and signature_difference(card, sig) < 1e-6
    sig["first_head"] = 2  # a head the card does not have
    check = compare_weights(card, sig)
    assert check.matches is None and "not in the card's signature" in check.detail


def test_layer0_weights_of_an_hf_model_and_the_reasons_there_are_none(models):
    a, _ = models
    live = compat.layer0_kv_weights(a)
    assert live["first_head"] == 0 and live["k"] is a.model.layers[0].self_attn.k_proj.weight
    assert "not available" in compat.layer0_kv_weights(None)
    assert "no attention layer" in compat.layer0_kv_weights(torch.nn.Linear(2, 2))
    odd = sglang_like_model(a)
    odd.model.layers[0].self_attn.qkv_proj.num_kv_heads = 3
    assert "not [(q + 2 kv) rows, hidden]" in compat.layer0_kv_weights(odd)


@pytest.mark.parametrize("weight, head_dim, what", [
    (torch.zeros(32, 8, dtype=torch.int8), 16, "2-D float tensor"),
    (torch.zeros(30, 8), 16, "does not split into heads"),
    (torch.zeros(32), 16, "2-D float tensor"),
])
def test_head_signatures_reject_what_is_not_a_projection(weight, head_dim, what):
    with pytest.raises(ModelIdentityError, match=what):
        head_signatures(weight, head_dim)


@pytest.mark.parametrize("edit, what", [
    (lambda s: s.update(version=9), "version 9"),
    (lambda s: s.update(probes=3), "probes=3"),
    (lambda s: s.update(k="x"), "'k' is not a list"),
    (lambda s: s["v"].pop(), "different head counts"),
    (lambda s: s["k"][0].__setitem__(0, float("nan")), "not 8 finite numbers"),
    (lambda s: s["k"][0].append(1.0), "not 8 finite numbers"),
])
def test_malformed_signatures_are_not_compared(models, edit, what):
    card = hf_model_signature(models[0], D)
    edit(card)
    assert what in signature_problem(card)
    check = compare_weights(card, hf_model_signature(models[0], D))
    assert check.matches is None and what in check.detail
