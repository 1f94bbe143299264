"""MovieLens-100K readers, both layouts, on tiny hand-made files (no download)."""

from __future__ import annotations

import pytest

from clients import movielens
from clients.interactions import DataError
from clients.validation import validate


def _grouplens(d):
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250951\n")
    genres = ["0"] * 19
    g1 = genres.copy()
    g1[1] = "1"  # Action
    g1[5] = "1"  # Comedy
    g2 = genres.copy()
    g2[8] = "1"  # Drama
    (d / "u.item").write_bytes(
        (f"10|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(g1)}\n"
         f"20|Caf\xe9 Society (1995)|01-Jan-1995||http://y|{'|'.join(g2)}\n").encode("latin-1")
    )  # fmt: skip
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")


def test_grouplens_layout(tmp_path):
    _grouplens(tmp_path / "ml")
    catalog, table, users = movielens.load(tmp_path / "ml")
    assert catalog.item_id.tolist() == ["10", "20"]
    assert catalog.department.tolist() == ["Action", "Drama"]  # primary = first listed genre
    assert "Café" in catalog.title[1]
    assert table.num_rows == 3
    assert dict(zip(users["user_id"], users["occupation"], strict=True)) == {"1": "technician", "2": "other"}
    assert validate(table, catalog, min_history=1).ok


def test_atomic_layout(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t3\t881250949\n1\t2\t3\t881250950\n"
    )
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    )
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n"
    )
    catalog, table, users = movielens.load(d)
    assert catalog.title.tolist() == ["Toy Story (1995)", "GoldenEye (1995)"]
    assert catalog.department.tolist() == ["Animation", "Action"]
    assert table.column("timestamp").to_pylist() == [881250949, 881250950]
    assert users["occupation"].tolist() == ["technician"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="fedmart data fetch movielens-100k"):
        movielens.load(tmp_path)
