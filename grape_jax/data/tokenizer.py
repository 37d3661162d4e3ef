"""A small deterministic byte-level BPE tokenizer, trained offline on the shipped text.

Tiny test and demo models need a real tokenizer in their directories (calibration and evaluation
tokenise text with the model's own tokenizer); `train_tokenizer` trains one in about a second with the
`tokenizers` library, and `save_pretrained` writes it next to the weights so that
`AutoTokenizer.from_pretrained(dir)` loads it offline. Special tokens take ids 0-3 in the order
<s> (BOS), </s> (EOS), <pad>, <unk>; no post-processor is set, so no special token is added implicitly
(the packing and scoring code adds BOS/EOS where it means to). Byte-level: every string round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grape_jax.data.text import default_calibration_texts

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
_BYTE_ALPHABET = 256
_CACHE: dict[int, PreTrainedTokenizerFast] = {}


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 1024, model_max_length: int = 2048, min_frequency: int = 0
) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with <s>, </s>, <pad>, <unk>; the same texts give the same vocab.

    `vocab_size` counts the 4 special tokens and the 256 byte symbols; merges fill the rest (fewer if
    the text has fewer pairs seen `min_frequency` times)."""
    texts = list(texts)
    minimum = _BYTE_ALPHABET + len(SPECIAL)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be >= {minimum} (256 bytes + {len(SPECIAL)} special tokens), got {vocab_size}"
        )
    if not any(isinstance(t, str) and t for t in texts):
        raise ValueError("train_tokenizer needs at least one non-empty text")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, clean_up_tokenization_spaces=False, **SPECIAL
    )


def default_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Tokenizer trained on the shipped calibration text, cached per process and `vocab_size`.

    The cached object is shared: do not mutate it (copy.deepcopy it first if you must)."""
    if vocab_size not in _CACHE:
        _CACHE[vocab_size] = train_tokenizer(default_calibration_texts(), vocab_size=vocab_size)
    return _CACHE[vocab_size]
