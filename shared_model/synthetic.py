"""A built-in synthetic catalog whose item texts carry the topics that drive preferences.

Items mix one or two topics and are described in English with those topics' words. A user
has a taste over topics that drifts from a start taste to an end taste over their
history, tends to stay on the topic of their previous item (a sequential signal), and
picks items within a topic by a long-tailed popularity. Everything is seeded and
vectorised: 100,000 users generate in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_model.data import Catalog, Dataset

TOPICS: dict[str, list[str]] = {
    "space": ["astronauts", "a distant galaxy", "a rocket launch", "alien worlds", "a starship crew", "orbiting moons"],
    "cooking": ["a family kitchen", "secret recipes", "a rival chef", "street food", "baking bread", "spicy dishes"],
    "crime": ["a detective", "a bank heist", "the mafia", "a murder case", "corrupt police", "a getaway driver"],
    "romance": ["first love", "a wedding", "a long-distance affair", "two old flames", "a love letter", "a summer kiss"],
    "war": ["soldiers", "a battlefield", "the front line", "a resistance cell", "a tank battalion", "fighter pilots"],
    "sports": ["a football team", "a boxing champion", "the final match", "a marathon runner", "a tough coach", "a comeback season"],
    "music": ["a rock band", "a jazz singer", "a piano prodigy", "a world tour", "a hip hop duo", "an orchestra"],
    "horror": ["a haunted house", "a zombie outbreak", "a cursed doll", "a vampire", "a masked killer", "a dark forest"],
    "animals": ["a lost dog", "wild horses", "a talking cat", "ocean whales", "a jungle tiger", "farm animals"],
    "history": ["an ancient empire", "medieval knights", "a royal court", "the industrial age", "pharaohs", "a colonial port"],
    "technology": ["a rogue robot", "a hacker", "artificial intelligence", "a startup founder", "virtual reality", "a computer virus"],
    "nature": ["mountain climbers", "a volcano", "a desert crossing", "an arctic expedition", "a great storm", "a rainforest"],
    "comedy": ["a clumsy office worker", "awkward neighbours", "a chaotic road trip", "a prank war", "a stand-up comic", "a bad blind date"],
    "family": ["a big family", "grandparents", "a new baby", "siblings", "a holiday reunion", "a single father"],
    "mystery": ["a locked room", "a missing heiress", "coded messages", "an old diary", "a secret society", "a vanished village"],
    "fantasy": ["a young wizard", "dragons", "an enchanted sword", "elves and dwarves", "a magic kingdom", "a witch's curse"],
}
FORMS = ["film", "novel", "series", "documentary", "drama", "comedy", "thriller", "story"]
MOODS = ["gripping", "gentle", "dark", "funny", "epic", "quiet", "moving", "wild"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and dynamics of the synthetic world; the defaults give a small, fast catalog."""

    n_users: int = 2000
    n_items: int = 800
    mean_history: int = 40  # interactions per user (at least min_history)
    min_history: int = 8
    taste_concentration: float = 0.3  # Dirichlet alpha: smaller means narrower tastes
    stay_on_topic: float = 0.5  # probability that the next item shares the previous item's topic
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity within a topic
    seed: int = 0

    @classmethod
    def for_population(cls, n_users: int, seed: int = 0) -> SyntheticConfig:
        """The world of `n_users` users: the small default catalog up to 8,000 users, then
        one item per USERS_PER_ITEM users, so that items keep about 400 interactions each
        (MovieLens-20M has 5 users and 740 ratings an item) and the catalog, like a real
        platform's, grows with its audience."""
        return cls(n_users=n_users, n_items=max(cls.n_items, n_users // USERS_PER_ITEM), seed=seed)


USERS_PER_ITEM = 10


def _make_catalog(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[Catalog, np.ndarray]:
    names = list(TOPICS)
    n_topics = len(names)
    primary = rng.integers(n_topics, size=cfg.n_items)
    secondary = np.where(rng.random(cfg.n_items) < 0.5, rng.integers(n_topics, size=cfg.n_items), primary)
    genres = np.zeros((cfg.n_items, n_topics), dtype=bool)
    genres[np.arange(cfg.n_items), primary] = True
    genres[np.arange(cfg.n_items), secondary] = True
    texts = []
    for i in range(cfg.n_items):
        words = list(rng.choice(TOPICS[names[primary[i]]], size=2, replace=False))
        if secondary[i] != primary[i]:
            words.append(rng.choice(TOPICS[names[secondary[i]]]))
        mood, form = rng.choice(MOODS), rng.choice(FORMS)
        article = "An" if mood[0] in "aeiou" else "A"
        texts.append(f"{article} {mood} {form} about {', '.join(words[:-1])} and {words[-1]}.")
    catalog = Catalog(texts, genres, names, np.arange(1, cfg.n_items + 1, dtype=np.int64))
    return catalog, primary


def _topic_samplers(genres: np.ndarray, popularity: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per topic: its items and the cumulative distribution of their popularity."""
    samplers = []
    for t in range(genres.shape[1]):
        members = np.flatnonzero(genres[:, t])
        cdf = np.cumsum(popularity[members])
        samplers.append((members, cdf / cdf[-1]))
    return samplers


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """Generate a seeded synthetic dataset (interactions in time order per user)."""
    rng = np.random.default_rng(cfg.seed)
    catalog, primary = _make_catalog(cfg, rng)
    n_topics = catalog.genres.shape[1]
    popularity = 1.0 / np.arange(1, cfg.n_items + 1) ** cfg.popularity_exponent
    popularity = popularity[rng.permutation(cfg.n_items)]
    samplers = _topic_samplers(catalog.genres, popularity)

    lengths = cfg.min_history + rng.geometric(1.0 / max(1, cfg.mean_history - cfg.min_history + 1), cfg.n_users) - 1
    steps = int(lengths.max())
    start = rng.dirichlet(np.full(n_topics, cfg.taste_concentration), cfg.n_users)
    end = rng.dirichlet(np.full(n_topics, cfg.taste_concentration), cfg.n_users)

    items = np.zeros((cfg.n_users, steps), dtype=np.int64)
    previous_topic = np.full(cfg.n_users, -1)
    seen = np.zeros((cfg.n_users, (cfg.n_items + 7) // 8), dtype=np.uint8)  # a bit per (user, item)
    for step in range(steps):
        active = np.flatnonzero(lengths > step)
        progress = np.minimum(step / np.maximum(lengths[active] - 1, 1), 1.0)[:, None]
        cdf = np.cumsum((1 - progress) * start[active] + progress * end[active], axis=1)
        topic = np.full(cfg.n_users, -1)
        topic[active] = np.minimum((rng.random(len(active))[:, None] > cdf).sum(axis=1), n_topics - 1)
        stay = (previous_topic[active] >= 0) & (rng.random(len(active)) < cfg.stay_on_topic)
        topic[active[stay]] = previous_topic[active[stay]]
        who = active
        for _attempt in range(10):  # redraw items the user has met already
            draws = rng.random(len(who))
            for t in range(n_topics):
                among = topic[who] == t
                members, member_cdf = samplers[t]
                items[who[among], step] = members[np.searchsorted(member_cdf, draws[among])]
            drawn = items[who, step]
            who = who[((seen[who, drawn >> 3] >> (drawn & 7)) & 1).astype(bool)]
            if not len(who):
                break
        drawn = items[active, step]
        seen[active, drawn >> 3] |= (1 << (drawn & 7)).astype(np.uint8)
        previous_topic[active] = primary[items[active, step]]

    users = np.repeat(np.arange(cfg.n_users), steps)
    flat_items = items.reshape(-1)
    keep = (np.arange(steps)[None, :] < lengths[:, None]).reshape(-1)
    gaps = rng.exponential(3600.0, size=(cfg.n_users, steps)).astype(np.int64) + 1
    times = (rng.integers(8.8e8, 9.0e8, size=cfg.n_users)[:, None] + np.cumsum(gaps, axis=1)).reshape(-1)
    users, flat_items, times = users[keep], flat_items[keep], times[keep]
    # A user meets an item once, as in MovieLens: keep the first meeting.
    _, first = np.unique(users * cfg.n_items + flat_items, return_index=True)
    first.sort()
    profiles = _profiles(start, catalog.genre_names)
    return Dataset(
        name="synthetic",
        catalog=catalog,
        users=users[first],
        items=flat_items[first],
        timestamps=times[first],
        n_users=cfg.n_users,
        profiles=profiles,
    )


def _profiles(taste: np.ndarray, names: list[str]) -> list[str]:
    """A user's own words about what they like: their two strongest starting topics."""
    top = np.argsort(-taste, axis=1)[:, :2]
    return [
        f"I like {TOPICS[names[a]][0]} and {TOPICS[names[a]][1]}, and also {TOPICS[names[b]][0]}." for a, b in top
    ]
