"""Chat templates for the gpt4all engine, which ignores the GGUF's own: the known formats (ChatML, Llama 3)
recognised in a GGUF's ``tokenizer.chat_template``, templates from the config completed from them, and the
GGUF metadata read without loading weights. A rendered prompt is a list of segments: template text, whose
special tokens are parsed, and message text, whose are not (a user cannot type a turn marker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lllmsd.core.jobs import ChatMessage
from lllmsd.errors import ModelUnavailable

Segment = tuple[str, bool]  # (text, parse special tokens in it)


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """How a conversation is written out for the model, as the pieces around each message's text.

    ``user_suffix`` ends a user turn and opens the assistant's: gpt4all-style templates
    (``...{0}...{1}...``) cannot separate the two, so neither does this.
    """

    name: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_suffix: str
    assistant_prefix: str | None = None  # opens an assistant turn with no user turn; None: an empty user turn

    def open_assistant(self) -> list[Segment]:
        if self.assistant_prefix is not None:
            return [(self.assistant_prefix, True)]
        return [(self.user_prefix, True), (self.user_suffix, True)]

    def render(self, messages: Sequence[ChatMessage], assistant_open: bool) -> tuple[list[Segment], bool]:
        """Segments for ``messages`` following a transcript whose assistant turn is (not) open.

        Rendering is incremental (the segments of a + b are those of a, then those of b from the state a
        left), which is what lets a follow-up turn evaluate only its new messages.
        """
        segments: list[Segment] = []
        for message in messages:
            content = message.content or ""
            if message.role == "assistant":
                if not assistant_open:
                    segments += self.open_assistant()
                segments += [(content, False), (self.assistant_suffix, True)]
                assistant_open = False
                continue
            if assistant_open:  # a turn the assistant never took: close it empty
                segments.append((self.assistant_suffix, True))
                assistant_open = False
            if message.role == "system":
                segments += [(self.system_prefix, True), (content, False), (self.system_suffix, True)]
            else:
                segments += [(self.user_prefix, True), (content, False), (self.user_suffix, True)]
                assistant_open = True
        return segments, assistant_open


CHATML = ChatFormat(
    name="chatml",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
)

LLAMA3 = ChatFormat(
    name="llama3",
    system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
    system_suffix="<|eot_id|>",
    user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
    user_suffix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_suffix="<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
)

# the marker that identifies a format in a GGUF's Jinja chat template -> the format
KNOWN_FORMATS: tuple[tuple[str, ChatFormat], ...] = (("<|im_start|>", CHATML), ("<|start_header_id|>", LLAMA3))


def detect_format(chat_template: str | None) -> ChatFormat | None:
    """The known format a GGUF chat template writes, or None."""
    if not chat_template:
        return None
    return next((fmt for marker, fmt in KNOWN_FORMATS if marker in chat_template), None)


def format_from_config(
    prompt_template: str | None, system_template: str | None, derived: ChatFormat | None
) -> ChatFormat:
    """The configured templates, completed from the derived format; raise ModelUnavailable if neither says."""
    if prompt_template is None and derived is None:
        raise ModelUnavailable(
            "gpt4all engine: this GGUF's chat template is not a format lllmsd recognises "
            f"({', '.join(f.name for _, f in KNOWN_FORMATS)}); set `prompt_template` (the user turn, with {{0}} "
            "for the message and {1} for the reply) and `system_template` (with {0}) in the model's config"
        )
    if prompt_template is None and system_template is None:
        assert derived is not None
        return derived
    if prompt_template is None:
        assert derived is not None
        user_prefix, user_suffix, assistant_suffix = derived.user_prefix, derived.user_suffix, derived.assistant_suffix
        assistant_prefix = derived.assistant_prefix
    else:
        user_prefix, _, rest = prompt_template.partition("{0}")
        user_suffix, _, assistant_suffix = rest.partition("{1}")
        assistant_prefix = None
    if system_template is not None:
        system_prefix, _, system_suffix = system_template.partition("{0}")
    elif derived is not None:
        system_prefix, system_suffix = derived.system_prefix, derived.system_suffix
    else:  # like gpt4all's own system_prompt: raw text before the first turn
        system_prefix, system_suffix = "", "\n\n"
    return ChatFormat(
        name="config",
        system_prefix=system_prefix,
        system_suffix=system_suffix,
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_suffix=assistant_suffix,
        assistant_prefix=assistant_prefix,
    )


@dataclass(frozen=True, slots=True)
class GgufInfo:
    chat_template: str | None
    context_length: int | None
    pre_tokenizer: str | None


def read_gguf_info(path: Path) -> GgufInfo:
    """The metadata this engine needs, read with the gguf package (memory-mapped: no weights are read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelUnavailable(
            "gpt4all engine: reading the GGUF's metadata needs the gguf package: pip install gguf"
        ) from None
    reader = GGUFReader(path)

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = value("general.architecture")
    context = value(f"{arch}.context_length") if arch else None
    return GgufInfo(value("tokenizer.chat_template"), int(context) if context else None, value("tokenizer.ggml.pre"))
