"""A seeded synthetic language for the character-level language-model studies.

No text is downloaded or shipped: the corpus is generated, the same for the same seed on
every machine, by a small probabilistic grammar over an invented lexicon (normlab's own
code, so under normlab's licence). It has structure at every range a language model can
learn, so that what a model learns beyond spelling depends on its attention:

- **spelling** (a few characters): words are built from consonant-vowel syllables, and each
  word class has its own endings;
- **agreement** (a few words): determiners, nouns and verbs agree in number ("la bimo
  dakes" / "le bimon dake"), also across a relative clause between subject and verb;
- **brackets and quotes** (a sentence): a parenthesis or quotation opened is closed;
- **a cast** (a paragraph): each paragraph introduces two or three names in its first
  sentence and then mostly talks about them, so predicting a name means copying it from
  earlier in the context;
- **a topic** (a paragraph): each paragraph draws most of its nouns and verbs from one of a
  few topic vocabularies, with Zipf-like frequencies.

Paragraphs end with a newline. A corpus of about a million characters takes about a second
to generate; :func:`load_text` caches it per process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["ALPHABET", "TextData", "decode", "encode", "generate_text", "load_text", "ngram_loss"]

#: Every character the language uses; a character's id is its index here.
ALPHABET = '\n !"(),.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
_INDEX = {c: i for i, c in enumerate(ALPHABET)}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_TOPICS = 6
_TOPIC_SHARE = 0.8  # of the nouns and verbs of a paragraph drawn from its topic's vocabulary


@dataclass(frozen=True)
class _Lexicon:
    nouns: tuple[str, ...]
    intransitive: tuple[str, ...]
    transitive: tuple[str, ...]
    adjectives: tuple[str, ...]
    adverbs: tuple[str, ...]
    names: tuple[str, ...]
    topics: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # per topic: noun and verb indices


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _words(rng: random.Random, count: int, syllables: tuple[int, ...], taken: set[str]) -> tuple[str, ...]:
    out = []
    while len(out) < count:
        word = _word(rng, rng.choice(syllables))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return tuple(out)


@lru_cache(maxsize=4)
def _lexicon(seed: int) -> _Lexicon:
    rng = random.Random(seed)
    taken: set[str] = {"la", "le", "ke", "ta", "sa", "po", "i"}  # the function words
    nouns = _words(rng, 72, (2, 2, 3), taken)
    intransitive = _words(rng, 24, (2, 3), taken)
    transitive = _words(rng, 36, (2, 3), taken)
    adjectives = tuple(w + "ul" for w in _words(rng, 30, (1, 2), taken))
    adverbs = tuple(w + "il" for w in _words(rng, 12, (2,), taken))
    names = tuple(w.capitalize() + "r" for w in _words(rng, 48, (2, 3), taken))
    verbs = len(intransitive) + len(transitive)
    topics = tuple(
        (tuple(rng.sample(range(len(nouns)), 16)), tuple(rng.sample(range(verbs), 10))) for _ in range(_TOPICS)
    )
    return _Lexicon(nouns, intransitive, transitive, adjectives, adverbs, names, topics)


def _zipf(rng: random.Random, items: tuple, exponent: float = 1.1):
    weights = [1.0 / (rank + 1) ** exponent for rank in range(len(items))]
    return rng.choices(items, weights)[0]


class _Writer:
    """One paragraph at a time: a topic, a cast of names, then sentences about them."""

    def __init__(self, lexicon: _Lexicon, rng: random.Random) -> None:
        self.lex, self.rng = lexicon, rng

    def noun(self, plural: bool) -> str:
        nouns = self.lex.nouns
        if self.rng.random() < _TOPIC_SHARE:
            stem = nouns[_zipf(self.rng, self.topic[0])]
        else:
            stem = self.rng.choice(nouns)
        return stem + "n" if plural else stem

    def verb(self, plural: bool, transitive: bool) -> str:
        lex, rng = self.lex, self.rng
        pool = lex.transitive if transitive else lex.intransitive
        stem = None
        if rng.random() < _TOPIC_SHARE:
            topical = [i for i in self.topic[1] if (i >= len(lex.intransitive)) == transitive]
            if topical:
                index = _zipf(rng, tuple(topical))
                stem = (lex.intransitive + lex.transitive)[index]
        stem = stem or rng.choice(pool)
        return stem if plural else stem + "s"

    def noun_phrase(self, subject: bool) -> tuple[str, bool]:
        """(words, plural). A subject is a name of the cast more often than not."""
        rng = self.rng
        if rng.random() < (0.55 if subject else 0.3):
            return rng.choice(self.cast), False
        plural = rng.random() < 0.4
        words = ["le" if plural else "la"]
        if rng.random() < 0.35:
            words.append(_zipf(rng, self.lex.adjectives))
        words.append(self.noun(plural))
        return " ".join(words), plural

    def clause(self, depth: int = 0) -> str:
        rng = self.rng
        subject, plural = self.noun_phrase(subject=True)
        parts = [subject]
        if depth == 0 and rng.random() < 0.25:
            # A relative clause between the subject and its verb: the outer verb still agrees
            # with the outer subject, several words back.
            inner, inner_plural = self.noun_phrase(subject=False)
            parts += ["ke", inner, self.verb(inner_plural, transitive=True)]
        transitive = rng.random() < 0.6
        parts.append(self.verb(plural, transitive))
        if transitive:
            parts.append(self.noun_phrase(subject=False)[0])
        if rng.random() < 0.2:
            parts.append(_zipf(rng, self.lex.adverbs))
        if depth == 0 and rng.random() < 0.12:
            parts[-1] += ","
            parts += ["po", self.clause(depth + 1)]
        return " ".join(parts)

    def sentence(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.12:
            body = f'{rng.choice(self.cast)} sa: "{self.clause(1).capitalize()}!"'
        elif roll < 0.22:
            body = f"{self.clause()} ({self.clause(1)})"
        elif roll < 0.3:
            return f"Ta {self.clause(1)}?"
        else:
            body = self.clause()
        return body[0].upper() + body[1:] + ("" if body.endswith('"') else ".")

    def paragraph(self) -> str:
        rng = self.rng
        self.topic = self.lex.topics[rng.randrange(_TOPICS)]
        self.cast = rng.sample(self.lex.names, rng.choice((2, 3)))
        intro = " i ".join(self.cast) + f" {self.verb(True, False)}."
        return " ".join([intro] + [self.sentence() for _ in range(rng.randint(3, 8))])


def generate_text(characters: int, seed: int = 0, *, lexicon_seed: int = 0) -> str:
    """At least ``characters`` characters of the language, whole paragraphs, each ending in a
    newline. ``seed`` draws the paragraphs, ``lexicon_seed`` the words (keep it fixed to get
    more text of the same language)."""
    writer = _Writer(_lexicon(lexicon_seed), random.Random(seed))
    paragraphs, total = [], 0
    while total < characters:
        paragraph = writer.paragraph() + "\n"
        paragraphs.append(paragraph)
        total += len(paragraph)
    return "".join(paragraphs)


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of ``text``; a character outside :data:`ALPHABET` is an error."""
    try:
        return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the language's alphabet") from None


def decode(ids) -> str:
    return "".join(ALPHABET[int(i)] for i in ids)


@dataclass(frozen=True)
class TextData:
    """Training and validation character ids of one language (validation from its own seed)."""

    train: torch.Tensor
    valid: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET)


@lru_cache(maxsize=2)
def load_text(train_characters: int = 1_000_000, valid_characters: int = 100_000) -> TextData:
    """The studies' corpus: ``train_characters`` of training text (seed 0) and
    ``valid_characters`` of validation text (seed 1), the same lexicon."""
    return TextData(encode(generate_text(train_characters, 0)), encode(generate_text(valid_characters, 1)))


def ngram_loss(data: TextData, order: int, smoothing: float = 0.5) -> float:
    """Validation cross-entropy (nats per character) of a count model that predicts each
    character from the ``order − 1`` before it (add-``smoothing`` estimates from the training
    text): the loss a model reaches with that much context and no more. ``order`` 1 or 2."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    vocab = data.vocab_size
    if order == 1:
        counts = torch.bincount(data.train, minlength=vocab).double() + smoothing
        return -(counts / counts.sum()).log()[data.valid].mean().item()
    pairs = torch.bincount(data.train[:-1] * vocab + data.train[1:], minlength=vocab * vocab).double()
    counts = pairs.view(vocab, vocab) + smoothing
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return -log_p[data.valid[:-1], data.valid[1:]].mean().item()
