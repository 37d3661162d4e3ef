"""A small deterministic byte-level BPE tokenizer, trained offline on the shipped text.

Tiny test and demo models need a real tokenizer in their directories (calibration tokenises text with
the model's own tokenizer); this trains one in about a second with the `tokenizers` library.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 1024, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with <s>, </s>, <pad>, <unk>; the same texts give the same vocab."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL)


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Tokenizer trained on the shipped calibration text (cached per process)."""
    from grape_jax.data import default_calibration_texts

    return train_tokenizer(default_calibration_texts(), vocab_size=vocab_size)
