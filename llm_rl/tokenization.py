"""Tokenizers: local Hugging Face tokenizers, and a character tokenizer for generated tasks.

- :func:`load_tokenizer` reads a local HF directory (``tokenizer.json`` + config) through
  transformers with no network access; chat templates work where the tokenizer has one
  (:func:`format_chat`).
- :func:`char_tokenizer` defines the project's small tokenizer: one token per printable
  ASCII character plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; it is built with the
  ``tokenizers`` library and saved in the same HF format, so every loader treats it alike.
- :func:`encode_prompts` left-pads a batch of prompts for generation (ids and mask).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from trainkit.nn.keymap import check_json_file

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# tokenizer_class values of a plain tokenizer.json tokenizer (transformers 5 writes the first)
PLAIN_FAST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class TokenizerError(ValueError):
    """A tokenizer directory is missing or unreadable."""


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: ids 0-3 are <pad> <bos> <eos> <unk>,
    then printable ASCII (32-126) and newline. Decoding joins characters back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """Write the tokenizer files into ``path``; in a multi-host run only process 0 writes (as
    :func:`llm_rl.models.save_pretrained`), so no process reads a file another is writing."""
    import jax

    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer from a local directory (never the network).

    A directory whose ``tokenizer_config.json`` names the plain fast tokenizer (what
    :func:`save_tokenizer` writes for :func:`char_tokenizer`) loads through that class;
    any other goes through ``AutoTokenizer``, which resolves the class the config names.
    Both give the same object for the plain class; the direct path skips ``AutoTokenizer``'s
    import of transformers' model configs, which imports torch where it is installed (~3 s
    per process on the 2-core CI machine, paid by every LLM experiment's run)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        check_json_file(path / name, TokenizerError)  # name the damaged file, not just the dir
    config = path / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    if isinstance(settings, dict) and settings.get("tokenizer_class") in PLAIN_FAST_TOKENIZER_CLASSES:
        from transformers import PreTrainedTokenizerFast as loader
    else:
        from transformers import AutoTokenizer as loader
    try:
        return loader.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types for unreadable files
        raise TokenizerError(f"{path}: cannot load tokenizer: {str(err).splitlines()[0][:200]}") from None


def format_chat(tokenizer, user_message: str, system: str | None = None) -> str:
    """The prompt text for one user turn: the tokenizer's chat template when it has one,
    else the message itself."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user_message


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_length: int | None = None,
                   add_bos: bool = True, pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [B, T] int32 and mask [B, T] (1 = token) for generation. Prompts longer
    than ``max_length`` keep their last ``max_length`` tokens; T is rounded up to a multiple of
    ``pad_to_multiple`` (fewer distinct shapes, fewer recompilations of jitted samplers)."""
    rows = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if max_length is not None:
            ids = ids[-max_length:]
        rows.append(ids)
    width = max(len(r) for r in rows) if rows else 0
    width = -(-width // pad_to_multiple) * pad_to_multiple
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def encode_sequences(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                     max_length: int, add_eos: bool = True) -> dict[str, np.ndarray]:
    """Right-padded training sequences ``<bos> prompt completion <eos>``: ids [B, T], mask
    [B, T] (1 = token) and loss_mask [B, T] (1 on completion tokens and the EOS).
    Sequences are cut to ``max_length``."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(prompts), max_length), pad, np.int32)
    mask = np.zeros_like(ids)
    loss_mask = np.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        p_ids = head + tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            c_ids = c_ids + [tokenizer.eos_token_id]
        row = (p_ids + c_ids)[:max_length]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        loss_mask[i, len(p_ids):len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
