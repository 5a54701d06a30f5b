r"""GPLinker event decoding: split the argument graph into events by clique search (Su, "GPLinker: 基于
GlobalPointer的事件联合抽取", https://kexue.fm/archives/8926).

GPLinker predicts the arguments of each event type (every (event type, role) is one GlobalPointer class, the
trigger being one more role) and, with two 1-head GlobalPointers (head–head and tail–tail, upper triangle), an
undirected edge between two arguments iff both pair scores are > 0: "these two arguments occur in one event".
An event is then a complete sub-graph (clique) of the argument graph of one event type.

The search, as the article states it:

1. if every pair of nodes of the graph is adjacent, the graph is one event: return its node set;
2. otherwise, for each non-adjacent pair ``(u, v)``, take the neighbourhood of ``u`` (``u`` with its neighbours, in
   the current sub-graph) and that of ``v``, and apply the search to the sub-graph each induces;
3. deduplicate the sets found.

Property (checked against brute force in ``tests/test_events.py``): the result is exactly the set of **maximal**
cliques of the graph (an isolated node is a maximal clique of its own). Proof sketch, by induction on the number of
nodes: (a) every returned set is a maximal clique of the graph it was searched in: true when the graph is complete;
otherwise a set returned from the neighbourhood :math:`N[u]` is maximal there, so it contains ``u`` (else adding
``u``, adjacent to all of :math:`N[u]`, would enlarge it), so any node adjacent to all of it is a neighbour of ``u``,
already inside :math:`N[u]`: it is maximal in the whole graph too. (b) every maximal clique ``C`` is found: if the
graph is not complete, some node ``w`` lies outside ``C`` and, ``C`` being maximal, ``w`` is not adjacent to some
``c`` in ``C``; the pair ``(c, w)`` is non-adjacent and ``C ⊆ N[c]``, a strictly smaller graph (without ``w``) in
which ``C`` is still maximal. So no returned set is a subset of another, and the article's deduplication is the
only clean-up needed. (Taking *one* non-adjacent pair instead of each would lose cliques: with nodes ``u, v, w, x``
and the single edge ``w–x``, splitting on ``(u, v)`` alone gives ``{u}``, ``{v}`` and never ``{w, x}``.)

The reference code (bojone/GPLinker ``duee_v1.py``) writes this as a recursion; here it runs as a work-list over
the distinct sub-graphs, which returns the same sets (each sub-graph is searched once, and there is no recursion
limit). Like any enumeration of maximal cliques it is exponential in the worst case (up to :math:`3^{n/3}`
cliques), which argument graphs of one sentence never approach.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

__all__ = ["clique_search"]

Node = TypeVar("Node", bound=Hashable)


def clique_search(nodes: Iterable[Node], edges: Iterable[tuple[Node, Node]]) -> list[frozenset[Node]]:
    r"""The events of an argument graph: its maximal cliques, found by the GPLinker clique search
    (https://kexue.fm/archives/8926; see the module docstring for the procedure and why it yields maximal cliques).

    Args:
        nodes: the arguments of one event type, any hashable values (e.g. ``(role, start, end)``); duplicates
            count once.
        edges: undirected pairs ``(u, v)`` of nodes that occur in one event; the order inside a pair and repeated
            pairs do not matter, and self-loops ``(u, u)`` are ignored.

    Returns:
        One ``frozenset`` of nodes per event, in a deterministic order: sorted by the positions of their nodes in
        ``nodes``. Empty for no nodes; a node without edges is an event of its own.

    Raises:
        ValueError: an edge that is not a pair, or that names a node missing from ``nodes``.

    Example::

        >>> # two events sharing the argument "Beijing": {t1, a, Beijing} and {t2, b, Beijing}
        >>> nodes = ["t1", "a", "t2", "b", "Beijing"]
        >>> edges = [("t1", "a"), ("t1", "Beijing"), ("a", "Beijing"), ("t2", "b"), ("t2", "Beijing"), ("b", "Beijing")]
        >>> [sorted(e) for e in clique_search(nodes, edges)]
        [['Beijing', 'a', 't1'], ['Beijing', 'b', 't2']]
    """
    order = list(dict.fromkeys(nodes))
    index = {node: i for i, node in enumerate(order)}
    adjacent: list[set[int]] = [set() for _ in order]
    for edge in edges:
        try:
            u, v = edge
        except (TypeError, ValueError):
            raise ValueError(f"clique_search: each edge must be a pair (u, v) of nodes, got {edge!r}.") from None
        for end in (u, v):
            if end not in index:
                raise ValueError(
                    f"clique_search: edge {edge!r} names {end!r}, which is not in nodes; add it to nodes or drop "
                    "the edge."
                )
        i, j = index[u], index[v]
        if i != j:
            adjacent[i].add(j)
            adjacent[j].add(i)

    found: set[frozenset[int]] = set()
    searched: set[frozenset[int]] = set()
    todo = [frozenset(range(len(order)))] if order else []
    while todo:
        graph = todo.pop()
        if graph in searched:
            continue
        searched.add(graph)
        # step 2 for every non-adjacent pair (u, v): the neighbourhoods N[u] and N[v] within this graph; a node's
        # neighbourhood is the same whichever pair it comes from, so collect each node's once.
        split = {graph & (adjacent[u] | {u}) for u in graph if not graph - {u} <= adjacent[u]}
        if split:
            todo.extend(split - searched)
        else:  # step 1: complete
            found.add(graph)
    return [frozenset(order[i] for i in clique) for clique in sorted(found, key=sorted)]
