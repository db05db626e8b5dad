"""Prompt formatting, in one place: question -> prompt text -> token ids, and response -> target ids.

Training, validation, `test`, SLOT, decoding studies and dynamics all encode through `PromptFormatter`,
so a result never differs because two code paths formatted a prompt differently. Prompt and response
are tokenised separately and concatenated as ids (never tokenised together and sliced, which shifts
when BPE merges across the join).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from core.errors import UserInputError


@dataclass
class PromptSpec:
    """How a question is turned into the model's prompt."""

    style: Literal["plain", "chat"] = "chat"
    """plain: `template` filled with the question; chat: the tokenizer's chat template."""
    template: str = "Question: {question}\nAnswer:"
    """The plain-style prompt; `{question}` is replaced by the question text (the planning-tokens code's is
    "Question: {question}\\n ")."""
    system_prompt: str | None = None
    """Chat style only: a system message (None keeps the chat template's own default)."""


class PromptFormatter:
    """Encodes prompts and responses for one tokenizer and one `PromptSpec`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: PromptSpec) -> None:
        if spec.style == "chat" and not tokenizer.chat_template:
            raise UserInputError("data.prompt.style=chat but the tokenizer has no chat template; use plain")
        if spec.style == "plain" and "{question}" not in spec.template:
            raise UserInputError("data.prompt.template must contain '{question}'")
        self.tokenizer = tokenizer
        self.spec = spec

    def prompt_text(self, question: str) -> str:
        """The prompt exactly as the model sees it (chat template applied, generation prompt added)."""
        if self.spec.style == "plain":
            return self.spec.template.replace("{question}", question)
        messages = [{"role": "user", "content": question}]
        if self.spec.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.spec.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_prompt(self, question: str, response_start: str = "") -> list[int]:
        """Token ids of the prompt (BOS added by the tokenizer in plain style, by the template in chat),
        followed by `response_start` encoded exactly as the start of a response (planning tokens' prefix)."""
        text = self.prompt_text(question)
        ids = self.tokenizer(text, add_special_tokens=self.spec.style == "plain").input_ids
        return ids + self.encode_response(response_start)[:-1] if response_start else ids

    def encode_response(self, response: str) -> list[int]:
        """Token ids of a target response, ending with EOS. Plain style puts a space after a template that ends
        without one ('Answer:' -> ' 42'); after one that ends in whitespace ('...\\n ') the response is kept as is."""
        if self.spec.style == "plain" and not self.spec.template[-1:].isspace():
            response = " " + response.lstrip()
        return self.tokenizer(response, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def encode_example(self, question: str, response: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels): prompt + response ids, with the prompt masked out (-100) of the loss."""
        prompt_ids = self.encode_prompt(question)
        response_ids = self.encode_response(response)
        return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids
