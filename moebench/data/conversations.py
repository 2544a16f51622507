"""LLaVA conversation data: reading, prompt templates, tokenisation with answer-only labels, collation.

Templates (LLaVA, Liu et al. 2023):
  chat  (llava_v1 / vicuna_v1): "[system ]USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
  plain (stage I pre-training):  "<image>" then the caption and </s>
Only answers (and their </s>) are supervised; prompts and image tokens get label -100.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from moebench.errors import MissingFile, UserError

IMAGE_PLACEHOLDER = "<image>"
IGNORE = -100
MEMO_PIECES = 1 << 15  # the shapes world has ~6,600 distinct pieces per stage


def read_conversations(path: Path, max_samples: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "training data file", "download the LLaVA JSON into the data root, or use data.source=shapes")
    try:
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is incomplete or damaged") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a LLaVA conversation list [{{'image', 'conversations': [...]}}, ...]")
    if not items:
        raise UserError(f"{path} holds no conversations; point the stage's `data` at a LLaVA conversation file")
    items = items[:max_samples] if max_samples else items
    for i, item in enumerate(items):
        problem = _record_problem(item)
        if problem:
            name = f" ({item.get('id')})" if isinstance(item, dict) and item.get("id") else ""
            raise UserError(f"{path}: conversation {i}{name} {problem}; fix or remove the record")
    return items


def _record_problem(item) -> str:
    """What is wrong with one LLaVA record, or "" when it can be trained on."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return "has no `conversations` list"
    turns = item["conversations"]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and "from" in t for t in turns):
        return "has a turn without `from` and a text `value`"
    if len(turns) < 2:
        return "has no answer (it needs a human turn and a gpt turn)"
    if turns[0]["from"] != "human":
        return f"starts with a {turns[0]['from']!r} turn, not a human one"
    return ""


def chat_prompt(question: str, system: str = "", first: bool = True) -> str:
    """The prompt part of one llava_v1 turn, ending where the assistant's answer starts."""
    head = f"{system} " if (first and system) else ""
    return f"{head}USER: {question} ASSISTANT:"


@dataclass
class Encoder:
    """Turns conversations / prompts into token ids with the image placeholder expanded to N tokens."""

    tokenizer: object
    n_image_tokens: int
    image_token_id: int
    system: str = ""
    max_len: int = 512

    def __post_init__(self):
        # text piece -> its ids, for the most recent MEMO_PIECES pieces. Tokenising is a pure function of the
        # text, and the pieces repeat: a stage shows each caption once per epoch, and the shapes world's
        # questions come from a few templates (calling the tokenizer was most of a batch's assembly time in
        # a profile of stage II). Bounded, because a real instruction set's pieces are mostly distinct.
        self._piece_ids = functools.lru_cache(maxsize=MEMO_PIECES)(
            lambda piece: self.tokenizer(piece, add_special_tokens=False)["input_ids"])

    def ids(self, text: str) -> list[int]:
        """Token ids of `text`; each <image> becomes n_image_tokens image ids."""
        out: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                out += [self.image_token_id] * self.n_image_tokens
            if piece:
                out += self._piece_ids(piece)
        return out

    def bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []

    def conversation(self, turns: list[dict], template: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for a LLaVA `conversations` list."""
        eos = self.tokenizer.eos_token_id
        ids, labels = self.bos(), []
        labels = [IGNORE] * len(ids)
        if len(turns) < 2 or turns[0].get("from") != "human":
            raise UserError(f"a conversation must start with a human turn and have an answer: {turns[:1]}")
        for k in range(0, len(turns) - 1, 2):
            q, a = turns[k]["value"], turns[k + 1]["value"]
            if template == "plain":
                prompt = self.ids(IMAGE_PLACEHOLDER) if k == 0 else []
                answer = self.ids(a) + [eos]
            else:
                prompt = self.ids(chat_prompt(q, self.system, first=k == 0))
                answer = self.ids(" " + a) + [eos]
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
        return ids[: self.max_len], labels[: self.max_len]

    def prompt(self, question: str) -> list[int]:
        """Ids of a single-turn evaluation prompt with one image."""
        return self.bos() + self.ids(chat_prompt(f"{IMAGE_PLACEHOLDER}\n{question}", self.system))


class ConversationDataset:
    """Map-style dataset over a LLaVA JSON: items are dicts of input_ids, labels, pixel_values, caption."""

    def __init__(self, items: list[dict], image_root: Path, encoder: Encoder, template: str, vision_cfg):
        self.items, self.image_root, self.encoder = items, Path(image_root), encoder
        self.template, self.vision = template, vision_cfg
        self.features: dict | None = None  # image name -> a frozen tower's features (moebench/train/frozen.py)
        self.memo: dict | None = None  # image name -> preprocessed pixels, kept when a stage shows images again

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import torch

        item = self.items[i]
        ids, labels = self.encoder.conversation(item["conversations"], self.template)
        caption = self.encoder.ids(item["conversations"][-1]["value"])[: 62] + [self.encoder.tokenizer.eos_token_id]
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "caption_ids": torch.tensor(caption)}
        if self.features is not None:
            out["vision_features"] = self.features[item["image"]]
        else:
            out["pixel_values"] = self.pixels(i)
        return out

    def pixels(self, i: int):
        """The preprocessed image of item i, (3, H, W)."""
        from moebench.data.images import load_pixels

        name = self.items[i]["image"]
        if self.memo is not None and name in self.memo:
            return self.memo[name]
        x = load_pixels(self.image_root / name, self.vision)
        if self.memo is not None:
            self.memo[name] = x
        return x


def pad_stack(seqs, value: int, left: bool = False):
    """Stack 1-D tensors into (B, T), padding on the right (training) or the left (generation)."""
    import torch

    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=seqs[0].dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if left:
            out[b, T - len(s):], mask[b, T - len(s):] = s, 1
        else:
            out[b, : len(s)], mask[b, : len(s)] = s, 1
    return out, mask


def collate(batch: list[dict], pad_id: int) -> dict:
    import torch

    ids, mask = pad_stack([b["input_ids"] for b in batch], pad_id)
    labels, _ = pad_stack([b["labels"] for b in batch], IGNORE)
    caps, cap_mask = pad_stack([b["caption_ids"] for b in batch], pad_id)
    image = "pixel_values" if "pixel_values" in batch[0] else "vision_features"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, image: torch.stack([b[image] for b in batch]),
            "caption_ids": caps, "caption_mask": cap_mask}
