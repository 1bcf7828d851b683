"""Tiny random BERT / RoBERTa / Whisper checkpoints with their own tokenizers, saved with
transformers' PyTorch `save_pretrained` (the hub is unreachable, so tests build their own)."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "the cat sat on the mat",
    "i am very happy today",
    "this is not good at all",
    "what a wonderful surprise",
    "please call me back later",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()})


def bert_checkpoint(folder: Path, *, tokenizer: bool = True, layers: int = 2) -> Path:
    """A random BertModel (hidden 32, `layers` layers) with a WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(folder)
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def roberta_checkpoint(folder: Path, *, layers: int = 2) -> Path:
    """A random RobertaModel with a byte-level BPE trained on `SENTENCES`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(SENTENCES * 4, vocab_size=300, min_frequency=1, special_tokens=specials)
    bpe.save_model(str(folder))
    tok = RobertaTokenizerFast(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")
    )
    tok.save_pretrained(folder)
    cfg = RobertaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=66, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(1)
    RobertaModel(cfg).eval().save_pretrained(folder)
    return folder


def whisper_checkpoint(
    folder: Path, builtin: str = "whisper-base", seed: int = 0, init_std: float | None = None
) -> Path:
    """A random 2+2-layer Whisper (d_model 32) with a real built-in's tokenizer, vocabulary size
    and generation config (special ids, suppress lists), saved as a PyTorch checkpoint.

    `init_std` redraws every weight matrix with that std (transformers' 0.02 makes a tiny
    model decode the same tokens for every clip; 0.3 gives each tone its own transcript)."""
    import shutil

    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from jax_ifmvse.backbones import ct2

    _, extras = ct2.builtin_files(builtin)
    pkg = __import__("json").loads((extras / "config.json").read_text())
    vocab = 51865 if builtin == "whisper-base" else 51864
    eot = 50257 if vocab == 51865 else 50256
    cfg = WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=448,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1,
        suppress_tokens=pkg.get("suppress_ids"), begin_suppress_tokens=pkg.get("suppress_ids_begin"),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    if init_std is not None:
        with torch.no_grad():
            for w in model.parameters():
                if w.dim() >= 2:
                    w.normal_(0.0, init_std)
    model.generation_config = ct2.generation_config(cfg, extras)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(extras / "tokenizer.json", folder / "tokenizer.json")
    return folder
