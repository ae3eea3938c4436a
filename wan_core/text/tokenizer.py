"""The umt5 tokenizer: prompt -> token ids padded to `text_len`, plus the attention mask.

The reference loads the Hugging Face tokenizer `google/umt5-xxl` (shipped beside the
official checkpoint as `google/umt5-xxl/`), cleans each prompt (`clean_prompt`), appends the
end-of-sequence token `</s>` (no start token), truncates to `text_len` = 512 tokens with the
`</s>` kept last, and pads with `<pad>` (id 0) to exactly `text_len`.

Two back-ends give those ids:
- a tokenizer folder with `tokenizer.json`/`tokenizer_config.json` is loaded with
  transformers' `AutoTokenizer`, exactly as the reference does;
- a bare sentencepiece model (a `spiece.model` file, its bytes, or the uint8 tensor
  `spiece_model` that ComfyUI stores inside its text-encoder files) is run with sentencepiece
  and `</s>` appended, as ComfyUI does. For ordinary prompts the ids are the same as the
  first back-end's (the tests check this); they differ only for prompts that spell out a
  special token such as "</s>" or "<extra_id_0>", which transformers turns into that token
  and sentencepiece treats as plain text.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from wan_core.configs import TEXT_LEN
from wan_core.text.clean import clean_prompt

TokenizerSource = Union[str, os.PathLike, bytes, torch.Tensor, "UMT5Tokenizer"]

SPIECE_FILE = "spiece.model"
_TRANSFORMERS_FILES = ("tokenizer.json", "tokenizer_config.json")


class UMT5Tokenizer:
    """Cleans, tokenizes, truncates and pads prompts like the reference.

    `ids_of(text)` must return the ids of one cleaned prompt *with* the trailing `</s>`,
    truncated to at most `max_length` ids; `pad_id` fills the rest of each row.
    """

    def __init__(self, ids_of: Callable[[str, int], list[int]], *, vocab_size: int, pad_id: int,
                 description: str) -> None:
        self._ids_of = ids_of
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.description = description

    def __call__(self, prompts: Sequence[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both int64 [len(prompts), text_len]; mask is 1 on real tokens."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of str (wrap a single prompt in a list)")
        ids = torch.full((len(prompts), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self._ids_of(clean_prompt(prompt), text_len)
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer({self.description}, vocab_size={self.vocab_size})"


def load_tokenizer(source: TokenizerSource) -> UMT5Tokenizer:
    """A `UMT5Tokenizer` from a tokenizer folder, a sentencepiece `.model` file, the bytes of
    one, or ComfyUI's uint8 `spiece_model` tensor. A `UMT5Tokenizer` is returned as is."""
    if isinstance(source, UMT5Tokenizer):
        return source
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.ndim != 1:
            raise TypeError(f"a tokenizer tensor must be the 1-D uint8 bytes of a sentencepiece model "
                            f"(ComfyUI's spiece_model), got {source.dtype} of shape {tuple(source.shape)}")
        return _sentencepiece_tokenizer(source.contiguous().numpy().tobytes(), "spiece_model tensor")
    if isinstance(source, (bytes, bytearray)):
        return _sentencepiece_tokenizer(bytes(source), "sentencepiece model bytes")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a folder, a sentencepiece .model file, its bytes or a uint8 "
                        f"tensor, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        return _sentencepiece_tokenizer(path.read_bytes(), str(path))
    if path.is_dir():
        if any((path / name).is_file() for name in _TRANSFORMERS_FILES):
            return _transformers_tokenizer(path)
        if (path / SPIECE_FILE).is_file():
            return _sentencepiece_tokenizer((path / SPIECE_FILE).read_bytes(), str(path / SPIECE_FILE))
        raise FileNotFoundError(f"{path} holds no umt5 tokenizer: expected tokenizer.json/tokenizer_config.json "
                                f"(a transformers tokenizer such as google/umt5-xxl) or {SPIECE_FILE}")
    raise FileNotFoundError(f"tokenizer not found: {path}")


def is_tokenizer_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (*_TRANSFORMERS_FILES, SPIECE_FILE))


def _sentencepiece_tokenizer(model_proto: bytes, description: str) -> UMT5Tokenizer:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{description} is not a sentencepiece model (corrupt or another file type?): "
                         f"{e}") from None
    eos = processor.eos_id()
    if eos < 0:
        raise ValueError(f"{description} has no end-of-sequence piece; the umt5 tokenizer appends </s> "
                         f"to every prompt. Is this the umt5 spiece model?")

    def ids_of(text: str, max_length: int) -> list[int]:
        return processor.encode(text)[:max_length - 1] + [eos]

    # the pad id only fills masked positions, so any valid id would do; umt5's is 0
    return UMT5Tokenizer(ids_of, vocab_size=processor.get_piece_size(), pad_id=max(processor.pad_id(), 0),
                         description=description)


def _transformers_tokenizer(folder: Path) -> UMT5Tokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder} could not be loaded as a transformers tokenizer: {e}") from None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {folder} has no </s> or <pad> token; expected the umt5 tokenizer "
                         f"(google/umt5-xxl)")

    def ids_of(text: str, max_length: int) -> list[int]:
        return tokenizer(text, truncation=True, max_length=max_length).input_ids

    return UMT5Tokenizer(ids_of, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, description=str(folder))
