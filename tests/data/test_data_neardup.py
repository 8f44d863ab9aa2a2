"""MinHash/LSH near-duplicate detection."""

from __future__ import annotations

import random

import numpy as np

from tunelab.data.neardup import cluster_labels, cross_duplicates, lsh_params, minhash, near_duplicates


def _doc(rng, n=200):
    return " ".join(f"w{rng.randrange(20000)}" for _ in range(n))


def _jaccard(a: str, b: str, k: int = 3) -> float:
    sa = {tuple(a.lower().split()[i : i + k]) for i in range(len(a.split()) - k + 1)}
    sb = {tuple(b.lower().split()[i : i + k]) for i in range(len(b.split()) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def test_signature_estimates_jaccard():
    rng = random.Random(0)
    base = _doc(rng)
    for edits in (0, 3, 10, 30):
        words = base.split()
        for _ in range(edits):
            words[rng.randrange(len(words))] = "edit"
        other = " ".join(words)
        sig = minhash([base, other])
        assert abs((sig[0] == sig[1]).mean() - _jaccard(base, other)) < 0.12


def test_case_and_punctuation_insensitive_and_deterministic():
    a = minhash(["Hello, world! This is it."])
    b = minhash(["hello world this is it"])
    assert (a == b).all() and (minhash(["x y z"]) == minhash(["x y z"])).all()


def test_empty_and_short_rows():
    sig = minhash(["", "one", "one two", "   "])
    assert (sig[0] == 0xFFFFFFFF).all() and (sig[3] == 0xFFFFFFFF).all()
    assert not (sig[1] == sig[2]).all()
    res = near_duplicates(["", "", "one two"])
    assert len(res.pair_i) == 0  # empty rows are not near duplicates of each other


def test_clusters_and_cross():
    rng = random.Random(1)
    docs = [_doc(rng) for _ in range(300)]
    docs.append(docs[10].replace(docs[10].split()[7], "zzz", 1))
    docs.append(docs[20] + " tail")
    res = near_duplicates(docs, 0.8)
    assert sorted(c.tolist() for c in res.clusters()) == [[10, 300], [20, 301]]
    assert res.redundant_rows().tolist() == [300, 301]
    a, b = minhash(docs[:200]), minhash([docs[5], _doc(rng)])
    i, j, s = cross_duplicates(a, b)
    assert i.tolist() == [5] and j.tolist() == [0] and s[0] == 1.0


def test_union_find_transitive():
    labels = cluster_labels(6, np.array([4, 2, 1]), np.array([5, 4, 0]))
    assert labels.tolist() == [0, 0, 2, 3, 2, 2]


def test_lsh_params_recall():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and 1 - (1 - 0.8**r) ** b >= 0.97
