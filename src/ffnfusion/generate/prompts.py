"""Prompts for `ffnfusion generate`: BOS alone, a chat template over built-in instructions, both (mix), or a user's
file."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Built-in instructions for chat models: every task with every topic (42 x 40 = 1680 distinct prompts).
TASKS = [
    "Explain {t} to a curious ten-year-old.",
    "Write a short essay about {t}.",
    "Give three surprising facts about {t}.",
    "Write a poem about {t}.",
    "Summarize the history of {t} in a paragraph.",
    "What are common misconceptions about {t}?",
    "Write a dialogue between two friends arguing about {t}.",
    "List the pros and cons of {t}.",
    "Describe {t} as if you were a tour guide.",
    "Write a news report about a discovery in {t}.",
    "How would you teach {t} to a beginner? Give a step-by-step plan.",
    "Write a short story in which {t} matters.",
    "Compare {t} with something from everyday life.",
    "What questions do experts still ask about {t}?",
    "Write a product description inspired by {t}.",
    "Give a one-sentence definition of {t}, then expand on it.",
    "Write a letter to a friend about {t}.",
    "Create a quiz of five questions about {t}, with answers.",
    "Explain how {t} changed over the last century.",
    "Write a persuasive paragraph in favour of {t}.",
    "What would the world look like without {t}?",
    "Describe a typical day of someone who works on {t}.",
    "Write a haiku sequence about {t}.",
    "Outline a lecture about {t}.",
    "Answer briefly: why does {t} matter?",
    "Write Python code that models something about {t}, and explain it.",
    "Give advice to someone starting in {t}.",
    "Write a limerick about {t}.",
    "Translate the main idea of {t} into simple words.",
    "Describe an experiment related to {t}.",
    "Write a job posting for a role in {t}.",
    "Write the opening of a mystery novel involving {t}.",
    "What ethical questions does {t} raise?",
    "Make a glossary of five terms used in {t}.",
    "Write a speech that opens a conference on {t}.",
    "Explain {t} using an analogy.",
    "Write a recipe-style guide to {t}.",
    "Tell a joke about {t} and explain it.",
    "Write a diary entry from the future about {t}.",
    "Describe {t} in exactly five sentences.",
    "What would a skeptic say about {t}, and how would you answer?",
    "Write an FAQ about {t}.",
]
TOPICS = [
    "photosynthesis",
    "the Roman Empire",
    "black holes",
    "machine learning",
    "coffee",
    "volcanoes",
    "jazz music",
    "the stock market",
    "honeybees",
    "the printing press",
    "climate change",
    "chess",
    "the human immune system",
    "ancient Egypt",
    "electric cars",
    "origami",
    "the ocean tides",
    "democracy",
    "prime numbers",
    "vaccines",
    "the Silk Road",
    "sleep",
    "renewable energy",
    "the internet",
    "dinosaurs",
    "gardening",
    "quantum computing",
    "friendship",
    "the moon landing",
    "bread baking",
    "recycling",
    "mountain climbing",
    "languages",
    "bicycles",
    "the water cycle",
    "video games",
    "earthquakes",
    "libraries",
    "the violin",
    "space exploration",
]
# Openings of prose that no training corpus starts from (training prompts are BOS alone, the instructions above, or
# the user's file): `run` samples its held-out perplexity text from them when the user gives none, so that text comes
# from other prompts, not only other seeds, than the healing corpus.
HELD_OUT_OPENERS = [
    "The village council met on a cold morning in",
    "According to the annual report, the company",
    "In the early years of the nineteenth century,",
    "The river rises in the hills north of",
    "She had never expected the letter to",
    "Researchers at the university announced that",
    "The match was delayed by rain, and",
    "Construction of the bridge began in",
    "The album was recorded over three weeks in",
    "Local farmers say the drought has",
    "The museum's new wing houses",
    "After the election, the new government",
    "The species is found mainly in",
    "He returned to the town where he had grown up",
    "The treaty, signed in",
    "The film opens with a long shot of",
    "Engineers tested the prototype engine",
    "The cathedral was rebuilt after a fire in",
    "Students in the program spend their first year",
    "The novel follows a young sailor who",
    "Traffic on the main road was",
    "The recipe calls for",
    "Historians disagree about why the kingdom",
    "The team's coach said after the game that",
    "A small earthquake shook the region",
    "The manuscript was discovered in",
    "The airline announced new routes to",
    "Most of the island is covered by",
    "The orchestra's season opened with",
    "Doctors at the hospital reported",
    "The mountain pass was closed for",
    "Her first book, published in",
]

PROMPT_MODES = ("auto", "bos", "chat", "mix")


class PromptError(ValueError):
    """Prompts that cannot be built with this tokenizer."""


class PromptSource:
    """Prompt token ids: BOS alone, chat-templated built-in instructions, or lines of a file; drawn per shard."""

    def __init__(self, tokenizer: Any, settings: Any, max_len: int):
        mode, limit = settings.prompts, min(settings.prompt_tokens, max_len // 2)
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if mode == "auto":
            # A chat model's free prose and its answers both: healing on the mix beat answers alone (RESULTS.md).
            mode = ("mix" if start is not None else "chat") if has_chat else "bos"
        self.start = start
        if mode == "bos":
            if start is None:
                raise PromptError("the tokenizer has neither a BOS nor an EOS token to start from: use --prompts FILE")
            self.prompts, self.kind, self.bos_share = [[start]], "bos", 0.0
            return
        # mix: half the documents from BOS alone (the model's free text), half answers to the instructions.
        self.bos_share = 0.5 if mode == "mix" else 0.0
        if mode == "mix" and start is None:
            raise PromptError("the tokenizer has neither a BOS nor an EOS token to start from: use --prompts chat")
        chat = mode in ("chat", "mix") or settings.prompt_format == "chat"
        if chat and not has_chat:
            raise PromptError("the tokenizer has no chat template: use --prompts bos or a prompts file as text")
        if mode in ("chat", "mix"):
            texts, self.kind = [task.format(t=topic) for task in TASKS for topic in TOPICS], mode
        else:
            path = Path(mode).expanduser()
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not texts:
                raise PromptError(f"--prompts {path} holds no non-blank line.")
            digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
            self.kind = f"file:{digest}:{'chat' if chat else 'text'}"
        self.prompts = [self._encode(tokenizer, t, chat, start, limit) for t in texts]

    @staticmethod
    def _encode(tokenizer: Any, text: str, chat: bool, start: int | None, limit: int) -> list[int]:
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return tokenizer(rendered, add_special_tokens=False)["input_ids"][-limit:]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = [start] if start is not None else []
        return (head + ids)[:limit] or head or [0]

    @property
    def max_len(self) -> int:
        return max(len(p) for p in self.prompts)

    def for_shard(self, seed: int, shard: int) -> Callable[[], list[int]]:
        rng = random.Random(f"{seed}:{shard}")

        def draw() -> list[int]:
            if self.bos_share and rng.random() < self.bos_share:
                return [self.start]
            return self.prompts[rng.randrange(len(self.prompts))]

        return draw
