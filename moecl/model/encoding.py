"""Turning task records into token ids, for both output modes, and left-padded batches.

classifier:  the text alone; the task's head reads the last token.
instruction: "<instruction>\\nOptions: a, b, c\\nText: <text>\\nAnswer:" followed by " <label><eos>"; the LM loss
             covers the answer tokens only. Texts are truncated (never the instruction or the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_INSTRUCTION = "Classify the text into one of the options."
IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    answer_start: int  # index of the first answer token (== len(input_ids) when there is no answer)
    label_index: int  # the class index (classifier mode), -1 if unknown
    task_id: str


def instruction_parts(instruction: str, labels: list[str]) -> tuple[str, str]:
    prefix = f"{instruction or DEFAULT_INSTRUCTION}\nOptions: {', '.join(labels)}\nText: "
    return prefix, "\nAnswer:"


class Encoder:
    """Tokenizes records of one task for one mode; caches the pieces that do not depend on the text."""

    def __init__(
        self, tokenizer, task_id: str, labels: list[str], instruction: str, mode: str, max_length: int
    ):
        self.tokenizer = tokenizer
        self.task_id = task_id
        self.labels = list(labels)
        self.mode = mode
        self.max_length = max_length
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        if mode == "instruction":
            prefix, suffix = instruction_parts(instruction, self.labels)
            self.prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
            self.suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
            self.answer_ids = {label: self.answer_tokens(label) for label in self.labels}

    def answer_tokens(self, label: str) -> list[int]:
        ids = self.tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def _text_ids(self, text: str, budget: int) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: max(1, budget)]

    def encode(self, text: str, label: str | None = None, with_answer: bool = True) -> Encoded:
        index = self.label_index.get(label, -1) if label is not None else -1
        if self.mode == "classifier":
            ids = self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            return Encoded(ids, len(ids), index, self.task_id)
        answer = self.answer_ids.get(label, []) if (with_answer and label is not None) else []
        longest_answer = max(len(a) for a in self.answer_ids.values())
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids) - longest_answer
        prompt = self.prefix_ids + self._text_ids(text, budget) + self.suffix_ids
        return Encoded(prompt + answer, len(prompt), index, self.task_id)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pid


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lm_labels: torch.Tensor  # IGNORE_INDEX outside the answers (instruction mode)
    class_labels: torch.Tensor  # class index per row (classifier mode), -1 where unknown
    tasks: list[str]
    for_task_loss: torch.Tensor  # bool per row: False for discriminator-memory rows

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.lm_labels.to(device),
            self.class_labels.to(device),
            self.tasks,
            self.for_task_loss.to(device),
        )

    def discriminator_mask(self, span: str = "all") -> torch.Tensor:
        """The tokens the task discriminator pools: every real token ("all", the paper), or the prompt's alone
        ("prompt"): answers are left out, so that rows with and without one are pooled over the same span."""
        if span == "all":
            return self.attention_mask
        return self.attention_mask * (self.lm_labels == IGNORE_INDEX)

    def answer_window(self) -> int:
        """How many final positions' LM logits the answer tokens need (1, predicting nothing, when none has one).

        Inputs are left-padded and each answer ends its row, so every answer token is predicted from one of the
        batch's last k positions, k = the longest answer + 1 (at most the width). The LM head then projects
        k positions instead of all of them: with a 49k vocabulary it is a fifth of a small model's FLOPs.
        """
        labelled = (self.lm_labels != IGNORE_INDEX).any(dim=0).nonzero()
        if labelled.numel() == 0:
            return 1
        width = self.lm_labels.shape[1]
        return min(width, width - int(labelled[0, 0]) + 1)

    def answer_targets(self, window: int) -> torch.Tensor:
        """The labels predicted by the logits of the last `window` positions but the final one."""
        width = self.lm_labels.shape[1]
        return self.lm_labels[:, width - window + 1 :]

    def select(self, rows: list[int]) -> Batch:
        """These rows only (same width: the padding stays as it was)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.lm_labels[index],
            self.class_labels[index],
            [self.tasks[i] for i in rows],
            self.for_task_loss[index],
        )


def collate(items: list[Encoded], pad: int, for_task_loss: list[bool] | None = None) -> Batch:
    """Left-pad a list of encoded records into one batch."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    lm_labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        offset = width - n
        ids[row, offset:] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, offset:] = 1
        if e.answer_start < n:
            lm_labels[row, offset + e.answer_start :] = torch.tensor(
                e.input_ids[e.answer_start :], dtype=torch.long
            )
    flags = torch.tensor(
        for_task_loss if for_task_loss is not None else [True] * len(items), dtype=torch.bool
    )
    return Batch(
        ids,
        mask,
        lm_labels,
        torch.tensor([e.label_index for e in items], dtype=torch.long),
        [e.task_id for e in items],
        flags,
    )
