"""Text views: every hidden state equal to transformers' PyTorch BERT/RoBERTa, pooling, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_text import SENTENCES, bert_checkpoint, roberta_checkpoint
from tolerances import assert_exceeds, assert_within, chain, encoder_ops

from jax_ifmvse.errors import BadSource
from jax_ifmvse.text.encoders import check_text_source, load_text_encoder, to_state_dict

TEXTS = [*SENTENCES[:3], "", "the cat"]  # ragged, with an empty transcript


def _torch_states(folder, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], enc["attention_mask"].numpy()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_every_hidden_state_matches_pytorch(tmp_path, family):
    make = bert_checkpoint if family == "bert" else roberta_checkpoint
    folder = make(tmp_path / family)
    enc = load_text_encoder(str(folder), cache_dir=tmp_path / "cache")
    ref, ref_mask = _torch_states(folder, TEXTS)
    ids, mask, truncated = enc.tokenize(TEXTS)
    assert not truncated.any()
    t = ref_mask.shape[1]
    np.testing.assert_array_equal(mask[:, :t], ref_mask)  # same tokenizer, same tokens
    assert not mask[:, t:].any()  # the bucket's extra width is padding only
    hidden = np.asarray(enc.hidden_states(enc.params, ids, mask))  # (L, B, T', D)
    assert hidden.shape[0] == len(ref) == 3

    def bound(layer, want):  # ours vs PyTorch: the embeddings' layer norm, 8 ops a layer, k 64
        return chain(encoder_ops(layer, front=1), 64, np.abs(want).max())

    for layer, want in enumerate(ref):
        for b in range(len(TEXTS)):
            n = int(ref_mask[b].sum())  # real tokens; PyTorch's pads are not compared
            got = hidden[layer, b, :n]
            assert_within(got, want[b, :n], bound(layer, want), f"layer {layer} row {b}")
    assert_exceeds(hidden[1, 0, :4], ref[2][0, :4], bound(2, ref[2]), "the next layer")
    # Pooled: mean over real tokens, and the first token as the option.
    pooled, _ = enc.encode(TEXTS)
    last = ref[-1]
    mean = (last * ref_mask[..., None]).sum(1) / ref_mask.sum(1, keepdims=True)
    top = bound(len(ref), last)
    assert_within(pooled[:, -1], mean, top, "mean pooled")
    first = load_text_encoder(str(folder), pooling="first", cache_dir=tmp_path / "cache")
    assert_within(first.encode(TEXTS)[0][:, -1], last[:, 0], top, "first token")
    assert_exceeds(last[:, 1], last[:, 0], top, "the second token")


def test_weights_round_trip_to_pytorch_keys(tmp_path):
    from safetensors.numpy import load_file

    folder = bert_checkpoint(tmp_path / "b")
    enc = load_text_encoder(str(folder))
    sd = load_file(str(folder / "model.safetensors"))
    back = to_state_dict(enc.params)
    assert set(back) == {k for k in sd if not k.startswith("pooler.")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k])


def test_truncation_keeps_the_end_token_and_flags_the_row(tmp_path):
    folder = bert_checkpoint(tmp_path / "b")
    enc = load_text_encoder(str(folder), max_tokens=6)
    ids, mask, truncated = enc.tokenize(["the cat sat on the mat today", "the cat"])
    assert truncated.tolist() == [True, False]
    assert ids.shape[1] == 6 and mask[0].sum() == 6
    assert ids[0, 0] == 2 and ids[0, 5] == 3  # [CLS] ... [SEP]


def test_refusals_are_one_line_before_loading(tmp_path):
    folder = bert_checkpoint(tmp_path / "b", tokenizer=False)
    with pytest.raises(BadSource, match="has no tokenizer") as e:
        check_text_source(str(folder))
    assert "\n" not in str(e.value)
    other = tmp_path / "w"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "wavlm"}))
    with pytest.raises(BadSource, match="'wavlm' is not supported"):
        check_text_source(str(other))
    with pytest.raises(BadSource, match="no such text checkpoint"):
        check_text_source(str(tmp_path / "missing"))
    with pytest.raises(BadSource, match="read offline: put config.json"):
        check_text_source("FacebookAI/roberta-large")


def test_builtin_minilm_matches_sentence_transformers_pooling(tmp_path):
    """The packaged all-MiniLM-L6-v2: our mean pooling equals PyTorch's on the real weights."""
    pytest.importorskip("all_minilm_l6_v2", reason="optional weights package")
    enc = load_text_encoder("all-MiniLM-L6-v2", cache_dir=tmp_path)
    folder = tmp_path / "text" / "all-MiniLM-L6-v2"
    texts = ["I am so happy to see you.", "This is terrible news.", ""]
    ref, mask = _torch_states(folder, texts)

    def pooled(h):
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    mean = pooled(ref[-1])
    # Two orders through 6 layers (k: the feed-forward's 1536) and the mean, as for the tiny ones.
    bound = chain(encoder_ops(6, 1), 1536, float(np.abs(ref[-1]).max()))
    got = enc.encode(texts)[0]
    assert_within(got[:, -1], mean, bound, "MiniLM pooled vs PyTorch")
    assert_exceeds(got[:, -1], pooled(ref[-2]), bound, "MiniLM, the layer before")
    assert enc.hidden_size == 384 and enc.num_hidden_states == 7
