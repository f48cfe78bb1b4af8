"""The ``builtin:topics`` data set: English sentences about four topics, generated, never downloaded.

Each sentence fills a topic-neutral template with one or two phrases of one topic. The templates
and each topic's phrases are split once (seeded) into a train part and a test part, so no test
sentence shares a template or a topic phrase with any train sentence: the test set measures whether
the model learnt the topics, not the strings. Sampling is seeded and labels are balanced.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from deltadist.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASETS = ("builtin:topics",)

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": (
        "penalty kick", "goalkeeper", "marathon", "tennis racket", "home team", "referee",
        "league table", "championship final", "basketball court", "sprint finish", "batting average",
        "offside rule", "world cup", "swimming relay", "cycling race", "hockey puck", "coach's tactics",
        "transfer window", "boxing match", "golf tournament", "stadium crowd", "scoring record",
        "playoff game", "ski jump", "volleyball net", "rugby scrum", "team captain", "olympic medal",
        "free throw", "football season",
    ),
    "cooking": (
        "garlic bread", "sourdough starter", "frying pan", "tomato sauce", "baking soda",
        "oven temperature", "chocolate cake", "vegetable soup", "roast chicken", "pasta recipe",
        "kitchen knife", "olive oil", "pancake batter", "spice rack", "slow cooker", "bread dough",
        "grilled salmon", "apple pie", "rice cooker", "mixing bowl", "cinnamon rolls", "stir fry",
        "cutting board", "beef stew", "whisked eggs", "pie crust", "curry paste", "lemon zest",
        "salad dressing", "pizza oven",
    ),
    "technology": (
        "smartphone update", "laptop battery", "software bug", "cloud server", "wifi router",
        "operating system", "graphics card", "password manager", "mobile app", "computer chip",
        "programming language", "data center", "touchscreen", "bluetooth headphones", "web browser",
        "robot vacuum", "database crash", "encryption key", "smartwatch", "video game console",
        "usb cable", "machine learning model", "keyboard shortcut", "cyber attack", "hard drive",
        "virtual reality headset", "source code", "network outage", "tablet screen", "search engine",
    ),
    "weather": (
        "thunderstorm", "heavy rain", "snowfall", "heat wave", "weather forecast", "strong wind",
        "morning fog", "hailstorm", "humidity", "cold front", "hurricane warning", "clear skies",
        "drizzle", "freezing temperatures", "rainbow", "tornado watch", "frost", "monsoon season",
        "air pressure", "lightning", "blizzard", "sunny spells", "flood warning", "dew point",
        "overcast sky", "gusty breeze", "ice storm", "drought", "weather radar", "rain clouds",
    ),
}
LABELS: tuple[str, ...] = tuple(TOPICS)

TEMPLATES: tuple[str, ...] = (
    "I spent the whole afternoon thinking about the {a}.",
    "My neighbour would not stop talking about the {a} and the {b}.",
    "Did you see the news about the {a}?",
    "The article on the {a} was surprisingly good.",
    "Everyone at work was discussing the {a} this morning.",
    "I never expected the {a} to matter so much.",
    "She wrote a long post comparing the {a} with the {b}.",
    "We argued for an hour about the {a}.",
    "The podcast today covered the {a} and then the {b}.",
    "Honestly, the {a} was the best part of my week.",
    "He asked me what I thought of the {a}.",
    "There is a new documentary about the {a}.",
    "My brother keeps sending me videos about the {a}.",
    "The {a} reminded me of the {b} from last year.",
    "Nobody could explain the {a} to me properly.",
    "I took some notes about the {a} and the {b}.",
    "The whole town seemed to care about the {a}.",
    "Tell me more about the {a}, please.",
    "Our teacher mentioned the {a} during the lesson.",
    "I read two books that describe the {a} and the {b}.",
    "The radio host made a joke about the {a}.",
    "Yesterday my friends and I looked into the {a}.",
    "It is hard to ignore the {a} these days.",
    "The magazine cover story was about the {a} and the {b}.",
)
TRAIN_FRACTION = 2 / 3


@dataclass(frozen=True)
class Example:
    """One sentence and its topic index into :data:`LABELS`."""

    text: str
    label: int


def load_topics(train_size: int, test_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The train and test splits: disjoint templates and phrases, balanced labels, deterministic.

    Raises:
        ConfigError: a split asks for more sentences than its templates and phrases can make.
    """
    rng = random.Random(seed)
    templates = _split(TEMPLATES, rng)
    phrases = {topic: _split(words, rng) for topic, words in TOPICS.items()}
    splits = []
    for part, size in enumerate((train_size, test_size)):
        per_label = [size // len(LABELS) + (i < size % len(LABELS)) for i in range(len(LABELS))]
        examples = []
        for label, (topic, count) in enumerate(zip(LABELS, per_label)):
            pool = sorted(set(_sentences(templates[part], phrases[topic][part])))
            if count > len(pool):
                raise ConfigError(
                    f"builtin:topics can make {len(pool)} distinct {('train', 'test')[part]} sentences "
                    f"per topic; {count} were asked for. Lower data.train_size / data.test_size."
                )
            examples += [Example(text, label) for text in rng.sample(pool, count)]
        rng.shuffle(examples)
        splits.append(examples)
    return splits[0], splits[1]


def _split(items: tuple[str, ...], rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = list(items)
    rng.shuffle(shuffled)
    cut = round(len(shuffled) * TRAIN_FRACTION)
    return shuffled[:cut], shuffled[cut:]


def _sentences(templates: list[str], phrases: list[str]) -> Iterator[str]:
    for template in templates:
        if "{b}" in template:
            for a, b in itertools.permutations(phrases, 2):
                yield template.format(a=a, b=b)
        else:
            for a in phrases:
                yield template.format(a=a)


def rank_share(size: int, rank: int, world_size: int) -> slice:
    """Rows ``rank`` takes of a global batch of ``size`` rows: a contiguous slice, in rank order.

    The slices tile ``range(size)``; their lengths differ by at most one (later ranks take the
    extra rows), and are all equal when ``world_size`` divides ``size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}.")
    return slice(rank * size // world_size, (rank + 1) * size // world_size)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Raise :class:`ConfigError` unless every rank can take an equal share of a global batch."""
    if batch_size % world_size:
        raise ConfigError(
            f"training.batch_size ({batch_size}) must be divisible by the world size ({world_size}): "
            f"each rank takes an equal, contiguous share of every global batch. Use e.g. "
            f"training.batch_size={max(world_size, batch_size // world_size * world_size)}."
        )


class Batches:
    """Tokenized batches (``input_ids``, ``attention_mask``, ``labels``, ``loss_scale``), padded per batch.

    With ``generator`` every pass draws a new order from it; without, examples keep their order.
    ``batch_size`` is the global batch: with ``world_size > 1`` each batch is this rank's
    contiguous share of it (see :func:`rank_share`), and ``batch_size`` must be divisible by
    ``world_size``. Every rank must use the same ``generator`` seed (so all draw one order).

    ``loss_scale`` makes ``cross_entropy(..., reduction="sum") * loss_scale`` this rank's part of the
    global batch's mean loss, times ``world_size``: gradient averaging over ranks (DDP, FSDP) then
    gives exactly the full-batch gradient, even for a last batch that does not split evenly.
    A rank whose share of a (short, last) batch is empty gets its neighbour's first row with
    ``loss_scale = 0``, so every rank still runs the forward and backward the collectives expect.
    The global batch is tokenized before it is split, so padding is the single-process run's.
    """

    def __init__(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 max_length: int, generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        check_batch_size(batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}.")
        self.examples = examples
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        """The number of (global) batches in one pass: every rank takes the same number of steps."""
        return math.ceil(len(self.examples) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.generator is None:
            order = list(range(len(self.examples)))
        else:
            order = torch.randperm(len(self.examples), generator=self.generator).tolist()
        for start in range(0, len(order), self.batch_size):
            chunk = [self.examples[i] for i in order[start:start + self.batch_size]]
            encoded = self.tokenizer([e.text for e in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            rows = rank_share(len(chunk), self.rank, self.world_size)
            scale = self.world_size / len(chunk)
            if rows.start == rows.stop:  # more ranks than rows left: a weightless stand-in row
                rows, scale = slice(rows.start - 1, rows.start) if rows.start else slice(0, 1), 0.0
            yield {
                "input_ids": encoded["input_ids"][rows],
                "attention_mask": encoded["attention_mask"][rows],
                "labels": torch.tensor([e.label for e in chunk])[rows],
                "loss_scale": torch.tensor(scale),
            }
