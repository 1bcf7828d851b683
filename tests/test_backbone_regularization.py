"""The baseline's backbone regularization (`ssl_model.train()`) against transformers' own.

Dropout, LayerDrop and SpecAugment are random, so they are compared by their statistics: the
fraction of masked frames against transformers' `_compute_mask_indices`, the rate of dropped
layers and the dropout scale against the torch model in train mode. `masked_spec_embed` is
converted, exported and loaded back in transformers unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import TINY_SSL
from tolerances import U32, assert_exceeds, assert_within, chain, encoder_ops
from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from jax_ifmvse.backbones.base import Regularization, mask_spans
from jax_ifmvse.backbones.conv_frontend import frame_mask
from jax_ifmvse.backbones.hubert import HubertBackbone
from jax_ifmvse.backbones.wavlm import WavLMBackbone

WAVLM = dict(feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
             num_buckets=16, max_bucket_distance=24)  # fmt: skip
OFF = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
           feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)  # fmt: skip


def _pair(**kw):
    """A tiny WavLM on both sides with the same weights; kw sets its regularization."""
    torch.manual_seed(0)
    config = WavLMConfig(**{**TINY_SSL, **WAVLM, **OFF, **kw})
    tm = WavLMModel(config)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    bb = WavLMBackbone(config, WavLMBackbone.convert(sd, config))
    return config, tm, bb


@pytest.mark.parametrize(
    ("prob", "length", "min_masks", "lengths", "seq"),
    [
        (0.075, 10, 2, (300, 250, 120, 40), 300),  # wavlm-large's time masking, 6 s at 50 Hz
        (0.5, 10, 2, (300, 160, 90, 25), 300),
        (0.05, 10, 2, (600, 600, 11, 9), 600),  # a clip too short for any span
        (0.3, 4, 0, (64, 64, 64, 64), 64),  # feature masking: no attention mask
    ],
)
def test_masked_fraction_matches_transformers(prob, length, min_masks, lengths, seq):
    """Per row: mean masked fraction and spans inside the valid frames, as transformers."""
    n = 3000
    lens = np.asarray(lengths)
    attn = torch.from_numpy((np.arange(seq)[None] < lens[:, None]).astype(np.int64))
    np.random.seed(0)
    ref = np.stack(
        [_compute_mask_indices((len(lens), seq), prob, length, attn, min_masks) for _ in range(n)]
    )  # (n, B, seq)
    draw = jax.jit(
        jax.vmap(lambda k: mask_spans(k, jnp.asarray(lens), seq, prob, length, min_masks))
    )
    ours = np.asarray(draw(jax.random.split(jax.random.key(0), n)))  # (n, B, seq)
    valid = np.arange(seq)[None] < lens[:, None]  # (B, seq)
    assert not ours[:, ~valid].any()  # never a padded frame
    for b in range(len(lens)):
        want = ref[:, b, : lens[b]].mean(1)  # per-draw fraction of the row's valid frames
        got = ours[:, b, : lens[b]].mean(1)
        se = np.hypot(want.std(), got.std()) / np.sqrt(n)
        assert abs(got.mean() - want.mean()) <= 4 * se + 1e-9, (b, got.mean(), want.mean())
        # Same spread of the number of masked frames (spans can overlap in both).
        assert abs(got.std() - want.std()) <= 0.15 * want.std() + 1e-3, (b, got.std(), want.std())


def _dropped_layers(states: list[np.ndarray]) -> np.ndarray:
    """Which layers passed their input on unchanged: (num_layers,) bool."""
    return np.asarray([np.array_equal(a, b) for a, b in zip(states[:-1], states[1:])])


@pytest.mark.slow
def test_layerdrop_rate_matches_transformers():
    """Layers dropped at rate `layerdrop`, WavLM's layer 0 never, on both sides."""
    p, n, t = 0.3, 100, 1200
    config, tm, bb = _pair(layerdrop=p, num_hidden_layers=6)
    lengths = np.asarray([t, 900])
    waves = np.random.default_rng(0).standard_normal((2, t)).astype(np.float32)
    mask = frame_mask(jnp.asarray(lengths), bb.num_frames(t), config)

    @jax.jit
    @jax.vmap
    def states(key):  # -> (L, B, F, D) per key
        out = bb.module.apply(
            {"params": bb.params}, waves, mask, lengths, False, rngs={"dropout": key}
        )
        return jnp.stack(out[:-1])

    s = np.asarray(states(jax.random.split(jax.random.key(1), n)))  # (n, L, B, F, D)
    ours = np.all(s[:, 1:] == s[:, :-1], axis=(2, 3, 4))  # (n, num_layers - 1)
    tm.train()
    am = torch.from_numpy((np.arange(t)[None] < lengths[:, None]).astype(np.int64))
    torch.manual_seed(1)
    theirs = []
    with torch.no_grad():
        for _ in range(n):
            hs = tm(torch.from_numpy(waves), attention_mask=am, output_hidden_states=True)
            theirs.append(_dropped_layers([h.numpy() for h in hs.hidden_states[:-1]]))
    theirs = np.stack(theirs)
    # The last state is layer-normed on both sides: the first num_layers - 1 layers are compared.
    assert not ours[:, 0].any() and not theirs[:, 0].any()  # WavLM keeps layer 0
    se = np.sqrt(p * (1 - p) / (n * (ours.shape[1] - 1)))
    assert abs(ours[:, 1:].mean() - p) < 4 * se
    assert abs(theirs[:, 1:].mean() - p) < 4 * se
    # And off in inference: every layer runs.
    det = bb.module.apply({"params": bb.params}, waves, mask, lengths)
    assert not _dropped_layers([np.asarray(s) for s in det[:-1]]).any()


def test_hidden_dropout_rate_and_scale_match_transformers():
    """The dropout after the positional conv: a fraction p zeroed, the rest scaled 1 / (1 - p)."""
    p = 0.25
    config, tm, bb = _pair(hidden_dropout=p)
    lengths = np.asarray([4000, 4000])
    waves = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    mask = frame_mask(jnp.asarray(lengths), bb.num_frames(4000), config)
    train = bb.module.apply(
        {"params": bb.params}, waves, mask, lengths, False, rngs={"dropout": jax.random.key(0)}
    )[0]
    det = bb.module.apply({"params": bb.params}, waves, mask, lengths)[0]
    am = torch.ones((2, 4000), dtype=torch.long)
    with torch.no_grad():
        tm.eval()
        t_det = tm(torch.from_numpy(waves), attention_mask=am, output_hidden_states=True)
        tm.train()
        t_train = tm(torch.from_numpy(waves), attention_mask=am, output_hidden_states=True)
    # Ours vs PyTorch before the layers: 3 convs, feature norm, projection, positional conv
    # (128 taps x 8 channels = 1024, the longest dot product), layer norm.
    want = t_det.hidden_states[0].numpy()
    bound = chain(encoder_ops(0, 7), 1024, np.abs(want).max())
    assert_within(np.asarray(det), want, bound, "WavLM hidden state 0 vs PyTorch")
    assert_exceeds(np.asarray(train), want, bound, "dropout applied")
    for tr, de in ((np.asarray(train), np.asarray(det)), (t_train.hidden_states[0].numpy(),
                                                          t_det.hidden_states[0].numpy())):  # fmt: skip
        kept = tr != 0
        assert abs((~kept).mean() - p) < 0.03
        # Dropout is the last op: x / (1 - p) against x * (1 / (1 - p)) (or x * scale rounded
        # to float32): three roundings of u relative at most, so 4 u of the value.
        want = de[kept] / (1 - p)
        assert_within(tr[kept], want, 4 * U32 * np.abs(want), "kept values scaled")
        assert_exceeds(de[kept], want, 4 * U32 * np.abs(want), "not scaled")


def test_regularization_from_config_and_overrides():
    """A checkpoint's own values (wavlm-large's config.json), and a copy carrying overrides."""
    large = WavLMConfig(hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                        feat_proj_dropout=0.1, layerdrop=0.1, mask_time_prob=0.075,
                        mask_time_length=10, mask_feature_prob=0.0)  # fmt: skip
    reg = Regularization.from_config(large)
    assert (reg.hidden_dropout, reg.attention_dropout, reg.feat_proj_dropout) == (0.1, 0.1, 0.1)
    assert (reg.layerdrop, reg.mask_time_prob, reg.mask_time_length) == (0.1, 0.075, 10)
    assert Regularization.from_config(WavLMConfig(apply_spec_augment=False)).mask_time_prob == 0
    off = Regularization().apply(large)
    assert off.hidden_dropout == 0 and off.mask_time_prob == 0 and not off.apply_spec_augment
    assert large.hidden_dropout == 0.1  # the original is untouched
    assert not Regularization().active and reg.active


@pytest.mark.slow
def test_time_masking_uses_a_trained_masked_spec_embed():
    """Masked frames carry `masked_spec_embed`, which gets a gradient in training only."""
    config, tm, bb = _pair(mask_time_prob=0.5, mask_time_length=2)
    want = tm.masked_spec_embed.detach().numpy()
    np.testing.assert_array_equal(bb.params["masked_spec_embed"], want)
    lengths = np.asarray([4000, 2500])
    waves = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    mask = frame_mask(jnp.asarray(lengths), bb.num_frames(4000), config)

    def loss(params, det):
        out = bb.module.apply(
            {"params": params}, waves, mask, lengths, det, rngs={"dropout": jax.random.key(3)}
        )
        return jnp.sum(out[-1] ** 2)

    g_train = jax.grad(loss)(bb.params, False)["masked_spec_embed"]
    g_det = jax.grad(loss)(bb.params, True)["masked_spec_embed"]
    assert np.abs(np.asarray(g_train)).max() > 0
    np.testing.assert_array_equal(np.asarray(g_det), 0)


def test_masked_spec_embed_exported_loads_in_transformers(tmp_path):
    """to_state_dict writes `masked_spec_embed`: transformers loads it finite and equal."""
    from safetensors.numpy import save_file

    config, _, bb = _pair(mask_time_prob=0.075)
    params = dict(bb.params)
    params["masked_spec_embed"] = jnp.linspace(-1.0, 1.0, config.hidden_size)  # "trained"
    config.save_pretrained(tmp_path)
    save_file(WavLMBackbone.to_state_dict(params, config), str(tmp_path / "model.safetensors"))
    model, info = WavLMModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = model.masked_spec_embed.detach().numpy()
    assert np.isfinite(got).all()
    # float32 written, float32 read: the same bits
    np.testing.assert_array_equal(got, np.asarray(params["masked_spec_embed"]))


def test_old_export_without_masked_spec_embed_still_loads():
    """A state dict lacking it (exports before it was kept) gets torch's U[0, 1) draw; a config
    that masks nothing has no such parameter."""
    torch.manual_seed(0)
    config = HubertConfig(**TINY_SSL, mask_time_prob=0.05)
    sd = {k: v.detach().numpy() for k, v in HubertModel(config).state_dict().items()}
    sd.pop("masked_spec_embed")
    emb = np.asarray(HubertBackbone.convert(sd, config)["masked_spec_embed"])
    assert emb.shape == (config.hidden_size,) and (emb >= 0).all() and (emb < 1).all()
    off = HubertConfig(**TINY_SSL, mask_time_prob=0.0)
    full = {k: v.detach().numpy() for k, v in HubertModel(config).state_dict().items()}
    assert "masked_spec_embed" not in HubertBackbone.convert(full, off)


@pytest.mark.slow
def test_finetune_with_regularization_on_still_learns():
    """Every regularization on (heavier than wavlm-large's): the CCC loss of a tiny task falls,
    and `masked_spec_embed` is trained."""
    from jax_ifmvse.config import load_config
    from jax_ifmvse.finetune.model import forward, frozen_labels, init_params, make_spec
    from jax_ifmvse.finetune.run import make_finetune_step, make_optimizer
    from jax_ifmvse.losses import ccc_sum_loss
    from jax_ifmvse.trainer.state import TrainState

    config, _, bb = _pair()  # the checkpoint itself has everything off
    over = dict(hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                feat_proj_dropout=0.1, layerdrop=0.2, mask_time_prob=0.3, mask_time_length=2)  # fmt: skip
    cfg = load_config(
        "finetune",
        ["finetune.head_hidden=16", "finetune.accumulation_steps=1", "train.batch_size=8",
         "train.learning_rate=3e-3", "finetune.head_dropout=0",
         *(f"finetune.{k}={v}" for k, v in over.items())],
    )  # fmt: skip
    spec = make_spec(bb, cfg)
    assert spec.regularization.layerdrop == 0.2 and spec.config.mask_time_prob == 0.3
    rng = np.random.default_rng(0)
    n, t = 8, 1600
    amp = np.linspace(0.05, 1.0, n).astype(np.float32)
    tt = np.arange(t) / 16000
    waves = (amp[:, None] * np.sin(2 * np.pi * 220 * tt)[None]).astype(np.float32)
    waves += 0.01 * rng.standard_normal(waves.shape).astype(np.float32)
    labels = np.stack([amp, amp[::-1], amp**2], 1).astype(np.float32)  # (n, 3)
    batch = {"waves": waves, "lengths": np.full(n, t, np.int32), "labels": labels,
             "weights": np.ones(n, np.float32)}  # fmt: skip
    params = init_params(spec, bb.params, jax.random.key(0))
    assert "masked_spec_embed" in params["backbone"]  # masking on: added as torch draws it
    labels_tree = frozen_labels(spec, params, True)
    tx = make_optimizer(cfg, labels_tree)
    step = make_finetune_step(spec, tx, labels_tree, jax.random.key(1))

    @jax.jit
    def eval_loss(p):
        pred = forward(spec, p, batch["waves"], batch["lengths"], train=False)
        return ccc_sum_loss(batch["labels"], pred, batch["weights"])

    start = float(eval_loss(params))
    emb0 = np.asarray(params["backbone"]["masked_spec_embed"])
    state = TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), tx.init(params))
    for _ in range(40):
        state, m = step(state, batch)
    end = float(eval_loss(state.params))
    assert end < 0.9 * start, (start, end)  # 3.02 -> 2.50 when written (40 steps)
    assert np.abs(np.asarray(state.params["backbone"]["masked_spec_embed"]) - emb0).max() > 1e-4


def _whisper_pair(**kw):
    """A tiny Whisper (1-s window: 50 encoder frames, 100 mel frames) on both sides."""
    from tiny_models import tiny_whisper_config
    from transformers import WhisperModel

    from jax_ifmvse.backbones.whisper import WhisperBackbone, convert_state_dict

    torch.manual_seed(0)
    config = tiny_whisper_config(max_source_positions=50, encoder_layers=6, d_model=16,
                                 encoder_attention_heads=2, encoder_ffn_dim=32, **kw)  # fmt: skip
    tm = WhisperModel(config)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    return config, tm, WhisperBackbone(config, convert_state_dict(sd, config), {})


@pytest.mark.slow  # 100 draws on both sides: about 30 s
def test_whisper_layerdrop_rate_matches_transformers():
    """Whisper's encoder layers (layer 0 too) dropped at rate `encoder_layerdrop`, drawn per call
    from the rng (transformers' Flax loop fixes one draw at trace time); torch's in train mode."""
    p, n = 0.3, 100
    config, tm, bb = _whisper_pair(encoder_layerdrop=p)
    feats = np.random.default_rng(0).standard_normal((2, 80, 100)).astype(np.float32)

    @jax.jit
    @jax.vmap
    def states(key):  # -> (L + 1, B, F, D) per key
        out = bb.module.apply({"params": bb.params}, feats, output_hidden_states=True,
                              deterministic=False, rngs={"dropout": key})  # fmt: skip
        return jnp.stack(out.hidden_states)

    s = np.asarray(states(jax.random.split(jax.random.key(1), n)))  # (n, L + 1, B, F, D)
    ours = np.all(s[:, 1:-1] == s[:, :-2], axis=(2, 3, 4))  # (n, L - 1): the last is normed
    assert ours.any(0).sum() >= 3 and not ours.all(0).any()  # drawn per call, not fixed
    enc = tm.encoder.train()
    torch.manual_seed(1)
    with torch.no_grad():
        theirs = np.stack([
            _dropped_layers([h.numpy() for h in enc(torch.from_numpy(feats),
                                                   output_hidden_states=True).hidden_states[:-1]])
            for _ in range(n)
        ])  # fmt: skip
    se = np.sqrt(p * (1 - p) / ours.size)
    assert abs(ours.mean() - p) < 4 * se and abs(theirs.mean() - p) < 4 * se
    assert ours[:, 0].any() and theirs[:, 0].any()  # Whisper may drop layer 0
    det = bb.module.apply({"params": bb.params}, feats, output_hidden_states=True)
    assert not _dropped_layers([np.asarray(h) for h in det.hidden_states[:-1]]).any()
    with torch.no_grad():
        t_det = tm.encoder.eval()(torch.from_numpy(feats)).last_hidden_state.numpy()
    # Ours vs PyTorch through 6 layers (conv1's 80 mels x 3 taps = 240 the longest dot product).
    bound = chain(encoder_ops(6, 3), 240, np.abs(t_det).max())
    assert_within(np.asarray(det.last_hidden_state), t_det, bound, "Whisper last state vs PyTorch")
    assert_exceeds(np.asarray(det.hidden_states[-2]), t_det, bound, "the layer before")


@pytest.mark.parametrize(("time", "feature"), [((0.3, 5, 2), (0.0, 10, 0)),
                                               ((0.0, 10, 2), (0.2, 8, 1))])  # fmt: skip
def test_whisper_spec_augment_matches_transformers(time, feature):
    """Masked mel frames (inside each row's valid frames) and masked mel bins, set to 0: the
    mean masked fraction per row against WhisperModel._mask_input_features in train mode."""
    from jax_ifmvse.backbones.whisper import mel_lengths, spec_augment

    n = 400
    kw = dict(apply_spec_augment=True, mask_time_prob=time[0], mask_time_length=time[1], mask_time_min_masks=time[2],
              mask_feature_prob=feature[0], mask_feature_length=feature[1],
              mask_feature_min_masks=feature[2])  # fmt: skip
    config, tm, bb = _whisper_pair(**kw)
    reg = Regularization.from_config(config)
    samples = np.asarray([16000, 9000, 3000])
    n_mel = np.asarray(mel_lengths(jnp.asarray(samples), 16000))
    assert list(n_mel) == [100, 57, 19]
    feats = np.random.default_rng(0).uniform(1.0, 2.0, (3, 80, 100)).astype(np.float32)
    draw = jax.jit(jax.vmap(lambda k: spec_augment(jnp.asarray(feats), k, n_mel, reg)))
    ours = np.asarray(draw(jax.random.split(jax.random.key(0), n))) == 0  # (n, B, M, T)
    attn = torch.from_numpy((np.arange(100)[None] < n_mel[:, None]).astype(np.int64))
    tm.train()
    np.random.seed(0)
    theirs = np.stack([
        tm._mask_input_features(torch.from_numpy(feats.copy()), attention_mask=attn).numpy() == 0
        for _ in range(n)
    ])  # fmt: skip
    for side in (ours, theirs):
        frames, bins = side.all(2), side.all(3)  # (n, B, T) masked frames, (n, B, M) bins
        assert not (frames & (np.arange(100) >= n_mel[:, None])[None]).any()  # padding never
        for got, want in ((frames, theirs.all(2)), (bins, theirs.all(3))):
            np.testing.assert_allclose(got.mean((0, 2)), want.mean((0, 2)), atol=0.03)
    assert ours.all(2).any() == (time[0] > 0) and ours.all(3).any() == (feature[0] > 0)


@pytest.mark.slow  # a tiny Whisper fine-tuning spec compiled in train mode: about 20 s
def test_whisper_finetune_takes_layerdrop_and_time_masking(tmp_path):
    """`finetune.layerdrop` and `finetune.mask_time_prob` on a Whisper (refused before): the
    training forward draws them from its rng, inference is the model without them."""
    from tiny_models import save_tiny_whisper

    from jax_ifmvse.backbones import load_backbone
    from jax_ifmvse.config import load_config
    from jax_ifmvse.finetune.model import encode, make_spec

    folder = save_tiny_whisper(tmp_path / "w", d_model=16, encoder_attention_heads=2,
                               encoder_ffn_dim=32)  # fmt: skip
    bb = load_backbone(str(folder)).with_window(1.0)
    on = ["finetune.layerdrop=0.5", "finetune.mask_time_prob=0.5", "finetune.mask_time_length=5"]
    spec = make_spec(bb, load_config("finetune", on))
    assert spec.regularization.layerdrop == 0.5 and spec.config.apply_spec_augment
    off = make_spec(
        bb, load_config("finetune", ["finetune.layerdrop=0", "finetune.mask_time_prob=0"])
    )
    waves = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16000)), jnp.float32)
    lengths = jnp.asarray([16000, 8000])
    params = jax.tree.map(jnp.asarray, bb.params)
    run = jax.jit(lambda k: encode(spec, params, waves, lengths, train=True, rng=k)[0])
    draws = [np.asarray(run(jax.random.key(i))) for i in range(4)]
    assert all(not np.array_equal(draws[0], d) for d in draws[1:])  # drawn per call
    ref = np.asarray(encode(off, params, waves, lengths)[0])
    np.testing.assert_array_equal(np.asarray(encode(spec, params, waves, lengths)[0]), ref)
