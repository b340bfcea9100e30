"""The input format table (data/formats.py): a new format is one class and its registration,
and the configs' ``format`` values are exactly the table's names."""

from __future__ import annotations

import json

import re
import typing

import pytest

from raytrieve.data import formats
from raytrieve.data.formats import FORMATS, CsvFormat
from raytrieve.data.sources import head_schema, open_source, plan_shards, read_shard
from raytrieve.data.train_source import list_pieces, read_piece
from raytrieve.errors import DataError
from raytrieve.inference.config import CorpusConfig, PairsConfig
from raytrieve.train.config import DatasetConfig


def _literal_values(cls: type) -> set[str]:
    # The annotation pydantic built the model with (fixed when the class was defined), not
    # typing.get_type_hints, which would evaluate the annotation again against today's table.
    hint = cls.model_fields["format"].annotation  # type: ignore[attr-defined]
    values: set[str] = set()
    for arg in typing.get_args(hint) or (hint,):
        if typing.get_origin(arg) is typing.Literal:
            values.update(typing.get_args(arg))
    return values


@pytest.mark.parametrize("cls", [CorpusConfig, PairsConfig, DatasetConfig])
def test_config_format_values_are_the_table(cls):
    names = set(FORMATS)
    assert _literal_values(cls) == names, (
        f"{cls.__name__}.format allows {sorted(_literal_values(cls))} but data/formats.py registers "
        f"{sorted(names)}; make the config's format field read the table (Literal[*FORMATS])"
    )


class TsvFormat(CsvFormat):
    """Tab-separated values: a csv variant, to show what adding a format takes."""

    name = "tsv"
    suffixes = (".tsv",)
    delimiter = "\t"


@pytest.fixture
def tsv():
    formats.register(TsvFormat())
    try:
        yield
    finally:
        formats.unregister("tsv")
    assert "tsv" not in FORMATS


def test_a_new_format_is_one_class_and_its_registration(tsv, tmp_path):
    ids = [f"doc-{i}" for i in range(40)]
    texts = [f"text {i}, with a comma" + " x" * (i % 5) for i in range(40)]
    path = tmp_path / "corpus.tsv"
    path.write_text("id\ttext\n" + "".join(f"{a}\t{b}\n" for a, b in zip(ids, texts)))

    source = open_source(str(path))  # the format comes from the suffix
    assert source.format == "tsv"
    assert head_schema(source).names == ["id", "text"]
    specs = plan_shards(source, rows_per_shard=3)
    assert len(specs) > 5 and all(s.format == "tsv" for s in specs)  # byte ranges, as csv
    rows = [r for s in specs for r in read_shard(s, ["id", "text"]).to_pylist()]
    assert [r["id"] for r in rows] == ids and [r["text"] for r in rows] == texts

    schema, pieces = list_pieces(tmp_path, "tsv")  # training reads it too
    assert schema.names == ["id", "text"] and [p.fmt for p in pieces] == ["tsv"]
    assert read_piece(pieces[0], ["id"]).column("id").to_pylist() == ids


def test_unknown_and_unregistered_formats_say_the_fix(tmp_path):
    path = tmp_path / "corpus.tsv"
    path.write_text("id\ttext\n1\ta\n")
    fix = "set format: parquet | jsonl | csv | hf"
    with pytest.raises(DataError, match=re.escape(f"cannot tell the format from the name; {fix}")):
        open_source(str(path))
    with pytest.raises(DataError, match=re.escape(f"unknown format 'tsv'; {fix}")):
        open_source(str(path), "tsv")


def test_suffixes_belong_to_one_format():
    seen: dict[str, str] = {}
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            assert suffix not in seen, f"{suffix} is claimed by both {seen[suffix]} and {fmt.name}"
            seen[suffix] = fmt.name


def test_jsonl_strings_shaped_like_dates_stay_strings_on_every_read_path(tmp_path, monkeypatch):
    """JSON has no timestamp type, but pyarrow reads date-shaped strings as timestamps: ids like
    "2020-01-01" came back as timestamp[s] (an encoding job refused such a corpus as "holds
    timestamp[s]"), and a later id that is no date failed the read in the shards or streams."""

    # Several blocks, and a head read of dates alone: the later ones hold the other ids.
    monkeypatch.setattr(formats, "STREAM_BLOCK", 1 << 10)
    monkeypatch.setattr(formats, "PROBE_BYTES", 1 << 12)
    ids = [f"2020-01-{i % 28 + 1:02d}" for i in range(3_000)] + ["doc-x", "2021-02-03T04:05:06"]
    texts = ["1999-12-31"] * 3_001 + ["plain text"]
    path = tmp_path / "dated.jsonl"
    path.write_text("".join(f'{{"id": "{a}", "text": "{b}", "n": {i}}}\n' for i, (a, b) in enumerate(zip(ids, texts))))
    source = open_source(str(path))
    schema = head_schema(source)
    assert schema.field("id").type == "string" and schema.field("text").type == "string"
    assert schema.field("n").type == "int64"  # only the dates are read as strings
    for rows_per_shard in (100_000, 70):  # one shard; many, the first ones all dates
        got = [r for s in plan_shards(source, rows_per_shard) for r in read_shard(s, ["id", "text"]).to_pylist()]
        assert [r["id"] for r in got] == ids and [r["text"] for r in got] == texts
    schema, pieces = list_pieces(path, "jsonl")  # training streams whole files
    assert schema.field("id").type == "string"
    table = read_piece(pieces[0], ["id", "text", "n"])
    assert table.column("id").to_pylist() == ids and table.column("n").to_pylist() == list(range(3_002))
    assert formats.get("jsonl").read_all(str(path)).column("text").to_pylist() == texts
    only_dates = tmp_path / "only_dates.jsonl"  # read whole, a file of dates alone was timestamps too
    only_dates.write_text("".join(f'{{"id": "{a}"}}\n' for a in ids[:5]))
    assert formats.get("jsonl").read_all(str(only_dates)).column("id").to_pylist() == ids[:5]
    # A value of another type is still an error, named by its line.
    path.write_text('{"id": "2020-01-01", "n": 1}\n{"id": 7, "n": 2}\n')
    with pytest.raises(DataError, match="dated.jsonl"):
        [read_shard(s, ["id"]) for s in plan_shards(open_source(str(path)), 100_000)]


def test_jsonl_dates_inside_lists_and_objects_stay_strings(tmp_path, monkeypatch):
    """A labeled-list's documents (a list of strings) or a field of an object can look like dates
    too: they came back as lists of timestamps, and a later value that is no date failed."""
    monkeypatch.setattr(formats, "STREAM_BLOCK", 1 << 10)
    docs = [[f"2020-01-{i % 28 + 1:02d}", "1999-12-31"] for i in range(300)] + [["not a date", "x"]]
    meta = [{"day": f"2020-02-{i % 28 + 1:02d}", "n": i} for i in range(300)] + [{"day": "later", "n": 300}]
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "documents": d, "meta": m}) + "\n"
                            for i, (d, m) in enumerate(zip(docs, meta))))
    whole = formats.get("jsonl").read_all(str(path))
    assert whole.column("documents").to_pylist() == docs and whole.column("meta").to_pylist() == meta
    assert whole.schema.field("meta").type.field("n").type == "int64"  # only the dates are read as strings
    _, pieces = list_pieces(path, "jsonl")  # training's stream, typed by a first block of dates alone
    streamed = read_piece(pieces[0], ["query", "documents", "meta"])
    assert streamed.column("documents").to_pylist() == docs and streamed.column("meta").to_pylist() == meta
    head = tmp_path / "head.jsonl"  # a shard's read of the dates alone
    head.write_text("".join(json.dumps({"documents": d}) + "\n" for d in docs[:3]))
    got = [r for sh in plan_shards(open_source(str(head)), 100_000) for r in read_shard(sh, ["documents"]).to_pylist()]
    assert [r["documents"] for r in got] == docs[:3]


def test_csv_strings_shaped_like_dates_stay_strings_in_streams_and_whole_reads(tmp_path, monkeypatch):
    """A csv stream (training's reader) is typed by its first block: date-shaped ids there made a
    date32 column, and a later id that is no date failed the read; a file of dates alone read
    whole came back as dates. Shards read the configured columns as text already."""
    monkeypatch.setattr(formats, "STREAM_BLOCK", 1 << 10)
    ids = [f"2020-01-{i % 28 + 1:02d}" for i in range(500)] + ["doc-x"]
    path = tmp_path / "dated.csv"
    path.write_text("id,n\n" + "".join(f"{a},{i}\n" for i, a in enumerate(ids)))
    schema, pieces = list_pieces(path, "csv")
    table = read_piece(pieces[0], ["id", "n"])
    assert table.column("id").to_pylist() == ids and table.column("n").to_pylist() == list(range(501))
    only = tmp_path / "only.csv"
    only.write_text("id\n" + "".join(f"{a}\n" for a in ids[:5]))
    assert formats.get("csv").read_all(str(only)).column("id").to_pylist() == ids[:5]
    assert formats.get("csv").read_all(str(path)).column("n").to_pylist() == list(range(501))
