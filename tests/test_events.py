"""GPLinker event decoding: clique search over the argument graph (lightning_gen.span.events, archives/8926)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gen.span import clique_search


def as_sets(result: list[frozenset]) -> set[frozenset]:
    assert len(set(result)) == len(result), "duplicates returned"
    return set(result)


def brute_maximal_cliques(n: int, edges: set[frozenset[int]]) -> set[frozenset[int]]:
    """Every subset of range(n) that is a clique and lies in no larger clique."""

    def is_clique(nodes: tuple[int, ...]) -> bool:
        return all(frozenset(p) in edges for p in itertools.combinations(nodes, 2))

    cliques = [frozenset(c) for r in range(1, n + 1) for c in itertools.combinations(range(n), r) if is_clique(c)]
    return {c for c in cliques if not any(c < other for other in cliques)}


def reference_recursion(argus: list[int], links: set[tuple[int, int]]) -> list[list[int]]:
    """The reference code's recursion (bojone/GPLinker duee_v1.py `clique_search`), restated for integer nodes."""

    def neighbours(host: int, nodes: list[int]) -> list[int]:
        return sorted([host] + [a for a in nodes if (host, a) in links])

    parts: list[list[int]] = []
    for i1, a1 in enumerate(argus):
        for a2 in argus[i1 + 1 :]:
            if (a1, a2) not in links:
                for part in (neighbours(a1, argus), neighbours(a2, argus)):
                    if part not in parts:
                        parts.append(part)
    if not parts:
        return [sorted(argus)]
    results: list[list[int]] = []
    for part in parts:
        for clique in reference_recursion(part, links):
            if clique not in results:
                results.append(clique)
    return results


# --- hand-built graphs ----------------------------------------------------------------------------------------------
def test_two_events_of_one_type_sharing_trigger_and_place() -> None:
    """A DuEE-style sentence with one trigger for two attacks in the same place: the arguments of each event are
    pairwise linked, nothing links attacker 1 or target 1 with attacker 2 or target 2 (kexue.fm/archives/8926 gives no
    worked example graph; this is the situation the article motivates the clique search with)."""
    event1 = {("trigger", "attack"), ("attacker", "A"), ("target", "X"), ("place", "P")}
    event2 = {("trigger", "attack"), ("attacker", "B"), ("target", "Y"), ("place", "P")}
    nodes = sorted(event1 | event2)
    edges = [tuple(p) for e in (event1, event2) for p in itertools.combinations(sorted(e), 2)]
    assert as_sets(clique_search(nodes, edges)) == {frozenset(event1), frozenset(event2)}


def test_complete_graph_is_one_event() -> None:
    nodes = list("abcde")
    assert clique_search(nodes, itertools.combinations(nodes, 2)) == [frozenset(nodes)]


def test_two_disjoint_events() -> None:
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("x", "y")]
    assert clique_search(["a", "b", "c", "x", "y"], edges) == [frozenset("abc"), frozenset("xy")]


def test_overlapping_events_sharing_an_argument() -> None:
    edges = [("t1", "a"), ("t1", "s"), ("a", "s"), ("t2", "b"), ("t2", "s"), ("b", "s")]
    got = clique_search(["t1", "a", "t2", "b", "s"], edges)
    assert got == [frozenset({"t1", "a", "s"}), frozenset({"t2", "b", "s"})]


def test_single_node_empty_graph_and_isolated_nodes() -> None:
    assert clique_search(["only"], []) == [frozenset({"only"})]
    assert clique_search([], []) == []
    assert clique_search([1, 2, 3], [(1, 2)]) == [frozenset({1, 2}), frozenset({3})]


def test_every_non_adjacent_pair_is_split_not_just_one() -> None:
    """Splitting on one non-adjacent pair (u, v) alone would return {u}, {v} and lose the event {w, x}."""
    assert as_sets(clique_search("uvwx", [("w", "x")])) == {frozenset("u"), frozenset("v"), frozenset("wx")}


def test_edges_are_undirected_repeats_and_self_loops_ignored() -> None:
    a = clique_search([1, 2, 3, 1], [(1, 2), (2, 1), (3, 3), (2, 3), (2, 3)])
    assert a == [frozenset({1, 2}), frozenset({2, 3})]


def test_deterministic_order_follows_nodes() -> None:
    edges = [("a", "b"), ("c", "d")]
    assert clique_search(["c", "d", "a", "b"], edges) == [frozenset("cd"), frozenset("ab")]
    assert clique_search(["a", "b", "c", "d"], edges) == [frozenset("ab"), frozenset("cd")]


def test_bad_edges_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"edge \('a', 'z'\) names 'z', which is not in nodes; add it to nodes"):
        clique_search(["a", "b"], [("a", "z")])
    with pytest.raises(ValueError, match=r"each edge must be a pair \(u, v\) of nodes, got \('a', 'b', 'c'\)"):
        clique_search(["a", "b", "c"], [("a", "b", "c")])
    with pytest.raises(ValueError, match=r"each edge must be a pair \(u, v\) of nodes, got 5"):
        clique_search(["a"], [5])


# --- properties -----------------------------------------------------------------------------------------------------
@st.composite
def graphs(draw: st.DrawFn, max_nodes: int = 8) -> tuple[int, set[frozenset[int]]]:
    n = draw(st.integers(0, max_nodes))
    pairs = list(itertools.combinations(range(n), 2))
    present = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    return n, {frozenset(p) for p, keep in zip(pairs, present) if keep}


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_result_is_exactly_the_maximal_cliques(graph: tuple[int, set[frozenset[int]]]) -> None:
    n, edges = graph
    got = as_sets(clique_search(range(n), [tuple(e) for e in edges]))
    for clique in got:  # every returned set is a clique
        assert all(frozenset(p) in edges for p in itertools.combinations(clique, 2))
    for edge in edges:  # every edge lies inside some event
        assert any(edge <= clique for clique in got)
    assert set().union(*got) == set(range(n))  # every argument is in some event
    assert not any(a < b for a in got for b in got)  # no event inside another
    assert got == brute_maximal_cliques(n, edges)


@settings(max_examples=60, deadline=None)
@given(graphs(max_nodes=7))
def test_same_sets_as_the_reference_recursion(graph: tuple[int, set[frozenset[int]]]) -> None:
    n, edges = graph
    links = {(a, b) for e in edges for a, b in itertools.permutations(e)}
    reference = {frozenset(c) for c in reference_recursion(list(range(n)), links)} if n else set()
    assert as_sets(clique_search(range(n), [tuple(e) for e in edges])) == reference
