"""Tokenizers: a byte-level BPE trained on the data's own text (embedded world), or a checkpoint's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from moebench.errors import UserError

PAD, EOS, UNK, IMAGE = "<pad>", "</s>", "<unk>", "<image>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with the `tokenizers` library; special tokens take ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IMAGE],
    )


def load_tokenizer(name_or_path: str):
    """Load a tokenizer from a local directory (or a hub id when online); add the image token."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).exists()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load tokenizer {name_or_path!r}: {str(e).splitlines()[0]} (give a local checkpoint directory)") from None
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Make sure the tokenizer has a pad token and the <image> placeholder (as LLaVA-HF does)."""
    if IMAGE not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "left"
    return tok


def image_token_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE)
