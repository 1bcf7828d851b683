"""Tiny random checkpoints shared by the tests (PyTorch side of the parity tests)."""

from transformers import WhisperConfig

# A tiny wav2vec2-family encoder (WavLM, HuBERT, Data2Vec-audio): the real 7-conv pattern shortened
# to 3 layers (kernels 10/3/2, strides 5/2/2).
TINY_SSL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 2),
    conv_stride=(5, 2, 2),
    num_conv_pos_embedding_groups=4,
    vocab_size=12,
)


def tiny_whisper_config(**kw) -> WhisperConfig:
    """A 2-layer d_model-32 Whisper; the 30-s input (max_source_positions 1500) is fixed."""
    args = dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        vocab_size=64,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    return WhisperConfig(**{**args, **kw})


def save_tiny_whisper(folder, seed: int = 0, **kw):
    """Write a random tiny WhisperModel checkpoint with `save_pretrained`; returns the folder."""
    import torch
    from transformers import WhisperModel

    torch.manual_seed(seed)
    WhisperModel(tiny_whisper_config(**kw)).save_pretrained(folder)
    return folder


# The real wav2vec2-family conv front end (7 layers, receptive field 400 samples = 25 ms at
# 16 kHz) with 8 channels: what decides the shortest usable clip, at a tiny cost.
TINY_SSL_REAL_FRONTEND = dict(
    TINY_SSL,
    conv_dim=(8,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
)


def save_tiny_wavlm(folder, seed: int = 0, **kw):
    """Write a random tiny WavLMModel checkpoint (real conv front end) with `save_pretrained`."""
    import torch
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    cfg = WavLMConfig(**{**TINY_SSL_REAL_FRONTEND, "num_buckets": 16, "max_bucket_distance": 24})
    WavLMModel(WavLMConfig(**{**cfg.to_dict(), **kw})).save_pretrained(folder)
    return folder
