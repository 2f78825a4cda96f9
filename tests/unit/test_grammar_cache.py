"""The grammar cache is bounded by what it holds, not only by how many: large grammars are not kept, the
least recently used go when their characters add up, and a source without a key is never kept."""

from __future__ import annotations

from app.engine.constraints.requested import GrammarCache


def test_the_cache_is_bounded_by_characters_and_keeps_the_recent_ones() -> None:
    cache = GrammarCache(size=64, max_chars=1000)
    cache.put("a", "x" * 90)
    cache.put("b", "y" * 90)
    assert cache.get("a") == "x" * 90  # a is now the most recently used
    for i in range(10):
        cache.put(f"k{i}", "z" * 90)
    assert cache.get("a") is None or cache.get("b") is None  # 12 x 90 > 1000: the oldest went
    assert cache.get("k9") == "z" * 90
    assert sum(len(cache.get(k) or "") for k in ["a", "b", *[f"k{i}" for i in range(10)]]) <= 1000


def test_large_and_unkeyed_grammars_are_built_but_not_kept() -> None:
    cache = GrammarCache(size=64, max_chars=1000)
    cache.put("big", "g" * 101)  # over a tenth of the cache
    cache.put("nan", "n" * 10, keep=False)
    assert cache.get("big") is None and cache.get("nan") is None
    assert cache.misses == 2 and cache.hits == 0
