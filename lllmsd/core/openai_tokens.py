"""Token ids as an OpenAI client means them: ids of OpenAI's cl100k_base encoding, decoded back to text.

An OpenAI client that sends token ids to ``/v1/embeddings`` (LangChain's ``OpenAIEmbeddings`` does by
default: it splits long texts with tiktoken and sends the ids) or a list of token-id prompts to
``/v1/completions`` means ids of OpenAI's tokenizer, cl100k_base for the embedding models. Read with a local
model's own vocabulary they are unrelated words. So the API decodes them to text (exactly: the encoding is a
byte-level BPE, and decoding is concatenating each token's bytes) and the model embeds or continues that
text with its own tokenizer. A model configured with ``token_ids: model`` reads ids in its own vocabulary
instead.

The encoding's table (100,256 tokens, 1.6 MB) is never downloaded: tiktoken fetches it at run time, which
a machine without internet cannot do. It is read from an installed copy, checked against the SHA-256 that
tiktoken itself pins for it:
- ``$TIKTOKEN_CACHE_DIR`` or tiktoken's own cache (``$TMPDIR/data-gym-cache``), where tiktoken keeps the
  file after a download, named by the SHA-1 of its URL;
- the copy LiteLLM ships (MIT licence) in ``litellm/litellm_core_utils/tokenizers/`` under the same name,
  for tiktoken to find offline; ``pip install lllmsd[token-ids]`` installs it.
If none is there, a request with token ids is a 400 that says what to change.

The table is read once per process and kept by ``cl100k_decoder`` (a read-only cache; loading takes about
0.1 s, so it happens on a thread the first time: see ``api/schemas/tokens.py``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

# tiktoken's names for the file: sha1 of its URL, and the sha256 it checks the contents against
CL100K_CACHE_NAME = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_SPECIAL = {
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    100276: "<|endofprompt|>",
}


class EncodingUnavailable(LookupError):
    """No installed copy of the cl100k_base table was found."""


class TokenOutOfRange(ValueError):
    def __init__(self, position: int, token: int) -> None:
        super().__init__(f"token id {token} is not in OpenAI's cl100k_base encoding")
        self.position = position
        self.token = token


class Cl100kDecoder:
    """Token ids of cl100k_base to text."""

    def __init__(self, table: Sequence[bytes]) -> None:
        self._table = table

    def decode(self, tokens: Iterable[int]) -> str:
        pieces = []
        for position, token in enumerate(tokens):
            if 0 <= token < len(self._table):
                pieces.append(self._table[token])
            elif token in CL100K_SPECIAL:
                pieces.append(CL100K_SPECIAL[token].encode())
            else:
                raise TokenOutOfRange(position, token)
        # a text cut mid-character (a chunk boundary) decodes with a replacement character, as tiktoken's does
        return b"".join(pieces).decode("utf-8", "replace")


def candidate_files() -> list[Path]:
    """Where an installed copy of the table may be, in the order they are tried."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    places = [Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"]
    spec = importlib.util.find_spec("litellm")  # finds the package without importing it (slow)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            places.append(Path(root) / "litellm_core_utils" / "tokenizers")
    return [place / CL100K_CACHE_NAME for place in places]


def read_table(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise ValueError(f"{path} is not OpenAI's cl100k_base table (its SHA-256 differs)")
    table: list[bytes] = []
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            if int(rank) != len(table):
                raise ValueError(f"{path}: ranks out of order at {int(rank)}")
            table.append(base64.b64decode(token))
    return table


@functools.cache
def cl100k_decoder() -> Cl100kDecoder:
    """The decoder, from the first installed copy of the table that checks out (read once per process)."""
    for path in candidate_files():
        if path.is_file():
            try:
                return Cl100kDecoder(read_table(path))
            except (OSError, ValueError):
                continue
    raise EncodingUnavailable(
        "no installed copy of OpenAI's cl100k_base encoding was found (pip install 'lllmsd[token-ids]', or set "
        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached file)"
    )
