"""The ``builtin:topics`` data set: English sentences about four topics, generated, never downloaded.

Each sentence fills a topic-neutral template with one or two phrases of one topic. The templates
and each topic's phrases are split once (seeded) into a train part and a test part, so no test
sentence shares a template or a topic phrase with any train sentence: the test set measures whether
the model learnt the topics, not the strings. Sampling is seeded and labels are balanced.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator

from deltadist.errors import ConfigError

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
