"""The download-free byte-level tokenizer of the random-weight and toy backbones.

:func:`byte_tokenizer` builds a ``PreTrainedTokenizerFast`` with 256 byte tokens (GPT-2's ByteLevel
alphabet, ordered by byte value), the chat-template specials at ids consistent with the model
config (:func:`assign_special_ids`) and, optionally, one token per given word (the trained toys).
"""
from __future__ import annotations

from typing import Mapping, Sequence

# The specials every backbone's tokenizer has (ids not fixed by the config follow the bytes).
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def assign_special_ids(fixed: Mapping[str, int], vocab_size: int) -> dict[str, int]:
    """Ids of all :data:`SPECIALS`: ``fixed`` ones (from the model config) as given, the others the
    next free ids from 256 (toy vocabularies, < 1000) or 151643 (the real Qwen2 vocabulary)."""
    used = set(fixed.values())
    ids, nxt = dict(fixed), (256 if vocab_size < 1000 else 151643)
    for name in SPECIALS:
        if name in ids:
            continue
        while nxt in used:
            nxt += 1
        ids[name] = nxt
        used.add(nxt)
        nxt += 1
    return ids


def _gpt2_byte_order() -> dict[str, int]:
    # GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _gpt2_byte_order()


def _vocabulary(special_ids: Mapping[str, int], words: Sequence[str]) -> dict[str, int]:
    """Bytes (ids 0..255 by byte value), the specials, then the words after the last special."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_ORDER.get(ch, 0))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update(special_ids)
    first = max(vocab.values()) + 1
    for k, w in enumerate(w for w in words if w not in vocab):
        vocab[w] = first + k
    return vocab


def byte_tokenizer(special_ids: Mapping[str, int], words: Sequence[str] = ()):
    """A byte-level tokenizer (256 byte tokens + specials at given ids) that needs no download.

    With ``words`` (pre-tokenized pieces in ByteLevel's alphabet, e.g. ``"Ġcolour"``), each of them
    is one token (ids after the last special), the text being split GPT-2 style into words first;
    any other word is spelled in bytes. The trained toys use this: short prompts, one token per word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=_vocabulary(special_ids, words), merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(words))
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special_ids)})
    fast.pad_token = "<|endoftext|>"
    fast.eos_token = "<|im_end|>"
    return fast
