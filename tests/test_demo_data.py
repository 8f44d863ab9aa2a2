"""The demo's dataset: plot rows excluded and counted, stratified, no review on both sides."""

from __future__ import annotations

import bz2
import csv
import io
import json

from tunelab import demo


def _corpus(path, n_fresh=60, n_rotten=40, n_plot=7):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for i in range(n_fresh):
        writer.writerow(["fresh", f"great film number {i}", "m", "True"])
    for i in range(n_rotten):
        writer.writerow(["rotten", f"awful film number {i}", "m", "True"])
    writer.writerow(["rotten", "great film number 3", "m", "True"])  # same text, other label: keep one side
    for i in range(n_plot):
        writer.writerow(["plot", f"a plot {i}", "m", "False"])
    path.write_bytes(bz2.compress(buffer.getvalue().encode()))
    return path


def test_split_is_stratified_disjoint_and_deterministic(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "rt.csv.bz2")
    monkeypatch.setattr(demo, "asset_path", lambda name: corpus)
    first = demo.build_demo_data(tmp_path / "a", n_eval=20, n_train=50, seed=0)
    second = demo.build_demo_data(tmp_path / "b", n_eval=20, n_train=50, seed=0)
    assert first.excluded == {"category=plot": 7}
    assert first.counts == {
        "eval": {"positive": 12, "negative": 8},
        "train": {"positive": 30, "negative": 20},
    }
    train_rows = first.train_path.read_text().splitlines()
    eval_rows = first.eval_path.read_text().splitlines()
    assert train_rows == second.train_path.read_text().splitlines()
    reviews = lambda rows: {json.loads(r)["instruction"] for r in rows}  # noqa: E731
    assert not reviews(train_rows) & reviews(eval_rows)
    row = json.loads(eval_rows[0])
    assert row["output"] in ("positive", "negative") and row["instruction"].startswith(
        "Classify the sentiment"
    )
