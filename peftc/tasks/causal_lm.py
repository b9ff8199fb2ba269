"""Causal language modelling: next-token cross-entropy (computed in chunks from the last hidden
states, see lm_loss.py); metrics are loss and perplexity exp(sum of token losses / predicted
tokens). Prediction continues a prompt greedily."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from peftc.config.spec import RunSpec, SpecNode, at_least, param
from peftc.errors import DataError
from peftc.tasks import chat, register
from peftc.tasks.base import Task, carry_fields, method_fields, shared_fields
from peftc.tasks.common import IGNORE_INDEX, leading_special_tokens, pad, pad_id, to_device
from peftc.tasks.data import load_splits
from peftc.tasks.generation import GenerationSpec, generate_kwargs
from peftc.tasks.lm_loss import next_token_loss


@dataclass
class CausalLmSpec(SpecNode):
    packing: bool = param(
        True,
        "Concatenate documents (separated by EOS) and cut into blocks of data.max_length (prompt_response and "
        "chat: whole examples per block, kept apart by position ids); false: one padded example per document.",
    )
    max_new_tokens: int = param(48, "Tokens generated per prompt at prediction time.", at_least(1))
    generation: GenerationSpec = field(
        default_factory=GenerationSpec,
        metadata={"help": "How predictions generate: task.generation.* (greedy by default)."},
    )
    train_on_prompt: bool = param(
        False,
        "data.format=prompt_response: also train on the prompt tokens (false: the loss covers the response only).",
    )


@register
class CausalLm(Task):
    name = "causal_lm"
    task_type = "CAUSAL_LM"
    schema = CausalLmSpec
    auto_class_name = "AutoModelForCausalLM"
    needs_encoder_decoder = False
    primary_metric = "val_perplexity"
    loss_in_chunks = True  # next_token_loss (lm_loss.py)
    fields = ("text",)
    input_fields = ("text",)
    generates_text = True

    list_fields = ("messages", "tools")  # data.format=chat: a row's conversation, the functions it may call
    # TRL's columns, read where a row has not peftc's (and data.columns does not map the field): a
    # prompt-completion row's `completion` is its response; as message lists, its `prompt` and
    # `completion` are one conversation (chat.conversation).
    trl_columns: ClassVar[dict[str, tuple[str, ...]]] = {
        "response": ("completion",),
        "messages": ("prompt", "completion"),
    }

    def data_fields(self, run: RunSpec) -> tuple[str, ...]:
        return {"text": ("text",), "prompt_response": ("prompt", "response"), "chat": ("messages",)}[run.data.format]

    def prediction_fields(self, run: RunSpec) -> tuple[str, ...]:
        # A chat adapter answers a conversation (a prompt_response one continues its prompt as text).
        return ("messages",) if run.data.format == "chat" else self.input_fields

    def optional_fields(self, run: RunSpec) -> dict[str, Any]:
        # a chat row's tools (TRL's `tools` column), which its template renders into the prompt
        return {"tools": None} if run.data.format == "chat" else {}

    def prediction_row(self, row: Mapping[str, Any], run: RunSpec, where: str) -> dict[str, Any]:
        """For a chat adapter a plain text is one user message; a conversation (and its tools) is checked."""
        if run.data.format != "chat":
            return dict(row)
        messages = row["messages"]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return _conversation(chat.check_messages(messages, where, answered=False), row.get("tools"), where)

    def read_rows(self, run: RunSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        conversations = ("prompt", "completion") if run.data.format == "chat" else ()
        return load_splits(
            run.data,
            self.data_fields(run),
            seed=run.seed,
            optional={**method_fields(run), **self.optional_fields(run)},
            lists=(*self.list_fields, *conversations),
            alternatives=self.trl_columns,
        )

    def datasets(self, run: RunSpec, tokenizer: Any) -> tuple[list, list]:
        train_rows, val_rows = self.read_rows(run)
        encode = {
            "text": self._examples,
            "prompt_response": self._prompt_response_examples,
            "chat": self._chat_examples,
        }[run.data.format]
        return tuple(
            encode(rows, run, tokenizer, split) for rows, split in ((train_rows, "train"), (val_rows, "validation"))
        )

    def _prompt_response_examples(
        self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any, split: str
    ) -> list[dict[str, list[int]]]:
        """(BOS +) prompt + response + EOS per row (the BOS the tokenizer adds); labels mask the prompt (unless task.train_on_prompt).
        Packing puts whole examples into blocks of up to data.max_length (never splits one)."""
        if not rows:
            return []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        bos = leading_special_tokens(tokenizer)
        examples = []
        for row in rows:
            prompt = bos + tokenizer(str(row["prompt"]), add_special_tokens=False)["input_ids"]
            answer = row["response"] if "response" in row else row["completion"]  # TRL's name for it
            response = tokenizer(str(answer), add_special_tokens=False)["input_ids"] + eos
            masked = prompt if run.task.train_on_prompt else [IGNORE_INDEX] * len(prompt)
            examples.append({"input_ids": prompt + response, "labels": masked + response})
        return self._finish_masked(examples, rows, run, split)

    def _chat_examples(
        self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any, split: str
    ) -> list[dict[str, list[int]]]:
        """Conversations rendered with the chat template; the loss on assistant turns (all tokens
        with task.train_on_prompt)."""
        if not rows:
            return []
        chat.check_template(tokenizer)
        examples = []
        for number, row in enumerate(rows, start=1):
            where = f"{run.data.path or 'data'} ({split} split, example {number})"
            tools = chat.check_tools(row.get("tools"), where)
            example = chat.encode(chat.conversation(row, where), tokenizer, where, tools)
            if run.task.train_on_prompt:
                example["labels"] = list(example["input_ids"])
            examples.append(example)
        return self._finish_masked(examples, rows, run, split)

    def _finish_masked(
        self, examples: list[dict[str, list[int]]], rows: Sequence[Mapping[str, Any]], run: RunSpec, split: str
    ) -> list[dict[str, list[int]]]:
        """Truncation and packing of examples that carry their own labels."""
        length, extra = run.data.max_length, method_fields(run)
        if run.data.truncation:
            examples = [{k: v[:length] for k, v in e.items()} for e in examples]
        for number, example in enumerate(examples, start=1):
            if all(label == IGNORE_INDEX for label in example["labels"]):
                raise DataError(
                    f"{run.data.path or 'data'} ({split} split, example {number})",
                    f"has no token to learn from within data.max_length={length} (the prompt fills it)",
                    "raise data.max_length or shorten the prompt",
                )
        if not run.task.packing:
            return carry_fields(rows, examples, extra)
        tags = shared_fields(rows, extra, f"data ({split})")
        return [{**block, **tags} for block in _pack_whole(examples, length)]

    def _examples(
        self, rows: Sequence[Mapping[str, Any]], run: RunSpec, tokenizer: Any, split: str
    ) -> list[dict[str, list[int]]]:
        if not rows:
            return []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        bos = leading_special_tokens(tokenizer)
        encoded = [bos + tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"] + eos for r in rows]
        length = run.data.max_length
        extra = method_fields(run)
        if not run.task.packing:
            examples = [{"input_ids": ids[:length] if run.data.truncation else ids} for ids in encoded]
            return carry_fields(rows, examples, extra)
        tags = shared_fields(rows, extra, f"data ({split})")
        stream = [token for ids in encoded for token in ids]
        blocks = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
        if not blocks:
            raise DataError(
                f"data ({split})",
                f"{len(stream)} tokens cannot fill one block of data.max_length={length}",
                "lower data.max_length or add text",
            )
        return [{"input_ids": block, **tags} for block in blocks]

    def collate(
        self, examples: Sequence[Mapping[str, Any]], tokenizer: Any, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        input_ids = pad(ids, pad_id(tokenizer), pad_to)
        mask = pad([[1] * len(i) for i in ids], 0, pad_to)
        if all("labels" in e for e in examples):  # prompt_response: the prompt is masked already
            labels = pad([e["labels"] for e in examples], IGNORE_INDEX, pad_to)
        else:
            labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if all("position_ids" in e for e in examples):  # whole examples packed into blocks
            batch["position_ids"] = pad([e["position_ids"] for e in examples], 0, pad_to)
        return batch

    def training_loss(self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None) -> torch.Tensor:
        total, tokens = next_token_loss(model, batch)
        return total / tokens.clamp_min(1)

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The tokens with a next-token target (the first position predicts nothing)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def validation_stats(
        self, model: Any, batch: Mapping[str, torch.Tensor], spec: Any = None
    ) -> dict[str, torch.Tensor]:
        total, tokens = next_token_loss(model, batch)
        return {"loss_sum": total.detach(), "tokens": tokens}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        if not totals.get("tokens"):
            return {}
        loss = totals["loss_sum"] / totals["tokens"]
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def sample_inputs(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The first sentence of each document, or a row's prompt (TRL's conversational prompt as a
        conversation), as the prompt to continue."""
        return [_sample_input(row) for row in rows]

    @torch.no_grad()
    def predict(self, model: Any, rows: Sequence[Mapping[str, Any]], tokenizer: Any, run: RunSpec) -> list[dict]:
        out, bos = [], leading_special_tokens(tokenizer)
        for row in rows:  # one prompt at a time: no padding inside a decoder's context
            if "messages" in row:  # the template writes its own special tokens
                text = chat.prompt_text(row["messages"], tokenizer, tools=row.get("tools"))
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                text = str(row["text"])
                ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids or [tokenizer.eos_token_id or 0]
            batch = to_device(
                {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}, model
            )
            generated = model.generate(
                **batch,
                max_new_tokens=run.task.max_new_tokens,
                pad_token_id=pad_id(tokenizer),
                **generate_kwargs(run.task.generation, run.seed),
            )
            new_tokens = generated[0, len(ids) :]
            out.append({"text": text, "generated": tokenizer.decode(new_tokens, skip_special_tokens=True)})
        return out


def _sample_input(row: Mapping[str, Any]) -> dict[str, Any]:
    # a conversation as {role, content} messages (ShareGPT's {from, value} read as those)
    where = "validation row"
    if "messages" in row:  # the conversation before its last answer
        return _conversation(chat.check_messages(row["messages"], where, answered=False), row.get("tools"), where)
    if isinstance(row.get("prompt"), list):  # TRL's conversational prompt, which asks for the completion
        prompt = chat.check_messages(row["prompt"], where, answered=False, name="prompt")
        return _conversation(prompt, row.get("tools"), where)
    if "prompt" in row:
        return {"text": str(row["prompt"])}
    first = str(row["text"]).split(". ")[0]
    return {"text": first if first.endswith(".") else first + "."}


def _conversation(messages: list[dict[str, Any]], tools: Any, where: str) -> dict[str, Any]:
    """A conversation to predict on, with its tools when it has some."""
    checked = chat.check_tools(tools, where)
    return {"messages": messages} if checked is None else {"messages": messages, "tools": checked}


def _pack_whole(examples: Sequence[Mapping[str, list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Greedy packing of whole examples, in order, into blocks of at most `length` tokens. Each
    example's positions start at 0, as they would alone: transformers reads a restart of
    `position_ids` (with no attention_mask) as the start of another sequence and lets no token
    attend across it (masking_utils.find_packed_sequence_indices, TRL's padding-free packing)."""
    blocks: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(example["input_ids"]) > length:
            blocks.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] = current["input_ids"] + list(example["input_ids"])
        # Nothing of the example predicts its first token (the last one of the example before would).
        current["labels"] = current["labels"] + [IGNORE_INDEX] + list(example["labels"][1:])
        current["position_ids"] = current["position_ids"] + list(range(len(example["input_ids"])))
    if current["input_ids"]:
        blocks.append(current)
    return blocks
