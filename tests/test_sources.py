"""Shard planning and reading (data/sources.py), no Ray: for every format the shards, read
one by one as workers read them, give back exactly the rows of the whole input in order,
none twice and none lost, and the plan comes from metadata alone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrieve.data.sources import head_schema, open_source, plan_shards, read_shard
from raytrieve.errors import DataError


def _rows(n: int, offset: int = 0) -> dict[str, list]:
    # Varied lengths, commas, quotes and non-ASCII, so byte ranges cut lines at odd places.
    return {"id": [f"doc-{offset + i}" for i in range(n)],
            "text": [f"text {offset + i}, " + "ünï \"q\" " * (i % 7) for i in range(n)]}


def _read_all(location: str, rows_per_shard: int, fmt: str | None = None) -> tuple[dict[str, list], list]:
    specs = plan_shards(open_source(location, fmt), rows_per_shard)
    tables = [read_shard(s, ["id", "text"]) for s in specs]
    merged = pa.concat_tables([t.select(["id", "text"]) for t in tables if t.num_rows]).to_pydict()
    return merged, specs


@pytest.mark.parametrize("rows_per_shard", [1, 7, 30, 1000])
def test_parquet_folder_row_groups_and_glob(tmp_path, rows_per_shard):
    folder = tmp_path / "corpus"
    folder.mkdir()
    expected: dict[str, list] = {"id": [], "text": []}
    for f, n in enumerate([45, 3, 20]):
        data = _rows(n, offset=sum([45, 3, 20][:f]))
        pq.write_table(pa.table(data), folder / f"part-{f}.parquet", row_group_size=8)
        for k in expected:
            expected[k] += data[k]
    (folder / "_SUCCESS").write_text("")
    merged, specs = _read_all(str(folder), rows_per_shard)
    assert merged == expected
    assert all(s.stop - s.start <= rows_per_shard for s in specs)
    assert [s.shard for s in specs] == list(range(len(specs)))
    glob_merged, _ = _read_all(str(folder / "part-*.parquet"), rows_per_shard)
    assert glob_merged == expected


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("rows_per_shard", [1, 2, 5, 50])
def test_line_formats_by_byte_ranges(tmp_path, fmt, rows_per_shard):
    data = _rows(37)
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(data["id"], data["text"])))
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.table(data), path)
    merged, specs = _read_all(str(path), rows_per_shard)
    assert merged == data
    if rows_per_shard < 37:
        assert len(specs) > 1


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=40), rows_per_shard=st.integers(1, 9),
       trailing_newline=st.booleans())
def test_jsonl_byte_ranges_never_lose_or_repeat_a_line(tmp_path_factory, lengths, rows_per_shard, trailing_newline):
    path = tmp_path_factory.mktemp("jsonl") / "c.jsonl"
    lines = [json.dumps({"id": str(i), "text": "x" * n}) for i, n in enumerate(lengths)]
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    merged, _ = _read_all(str(path), rows_per_shard)
    assert merged["id"] == [str(i) for i in range(len(lengths))]


def test_hf_datasets_folder_and_file_uri(tmp_path):
    import datasets

    data = _rows(50)
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf"))
    merged, specs = _read_all(str(tmp_path / "hf"), 12)
    assert merged == data and [s.stop - s.start for s in specs] == [12, 12, 12, 12, 2]
    pq.write_table(pa.table(data), tmp_path / "c.parquet")
    uri_merged, uri_specs = _read_all(f"file://{tmp_path}/c.parquet", 12)
    assert uri_merged == data and uri_specs[0].path.startswith("file://")


def test_plan_reads_metadata_only_and_names_problems(tmp_path):
    pq.write_table(pa.table(_rows(10)), tmp_path / "c.parquet")
    source = open_source(str(tmp_path / "c.parquet"))
    assert source.files[0].rows == 10 and head_schema(source).names == ["id", "text"]
    with pytest.raises(DataError, match="corpus.path .*nope.parquet: file not found"):
        open_source(str(tmp_path / "nope.parquet"), field="corpus.path")
    (tmp_path / "c.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format"):
        open_source(str(tmp_path / "c.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read it as parquet"):
        open_source(str(tmp_path / "bad.parquet"))


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path, monkeypatch):
    """pyarrow numbers a failing JSON row from 0 within the block or byte range it parses; the
    error names the line in the whole file (from 1, as editors and ``sed -n 61p`` do) and why,
    whichever shard holds it, in the encoding job's shards and in training's streamed files."""
    from raytrieve.data import formats
    from raytrieve.data.train_source import iter_piece, list_pieces

    rows = [json.dumps({"id": f"d{i}", "text": f"text {i} " * (i % 5 + 1)}) for i in range(130)]
    for line, bad, why in ((61, '{"id": "d60", "text": "unclosed', r"line 61 is not JSON \(Unterminated string"),
                           (125, '["d124", "a list"]', "line 125 is a JSON list, not an object")):
        path = tmp_path / f"bad{line}.jsonl"
        path.write_text("\n".join(rows[: line - 1] + [bad] + rows[line:]) + "\n")
        specs = plan_shards(open_source(str(path)), 20)
        assert len(specs) > 2 and specs[0].start == 0
        holder = [s for s in specs if s.start > 0 and bad.encode() in path.read_bytes()[s.start : s.stop + 200]]
        assert holder  # a shard past the first
        with pytest.raises(DataError, match=rf"bad{line}.jsonl: cannot read it as jsonl \({why}"):
            for spec in holder:
                read_shard(spec, ["id", "text"])
        with pytest.raises(DataError, match=rf"bad{line}.jsonl: cannot read it as jsonl \({why}"):
            list_pieces(path, "jsonl")  # training reads the first block for the schema
    # Past training's first block (the schema read it): the streamed piece names the line.
    monkeypatch.setattr(formats, "STREAM_BLOCK", 1 << 16)
    path = tmp_path / "deep.jsonl"
    many = [json.dumps({"id": f"d{i}", "text": "x" * 40}) for i in range(30_000)]
    path.write_text("\n".join(many[:25_000] + ["{oops"] + many[25_001:]) + "\n")
    assert path.stat().st_size > 20 * formats.STREAM_BLOCK
    _, pieces = list_pieces(path, "jsonl")
    with pytest.raises(DataError, match=r"deep.jsonl: cannot read it as jsonl \(line 25001 is not JSON"):
        list(iter_piece(pieces[0], ["id", "text"]))
    # Every line JSON, a value changing type: pyarrow's reason stands, and the line the search's
    # read cut off at its end (SEARCH_BYTES, small here) is not taken for a bad one.
    monkeypatch.setattr(formats, "SEARCH_BYTES", 4096)
    path = tmp_path / "typed.jsonl"
    path.write_text("\n".join(many[:150] + [json.dumps({"id": "d150", "text": 7})] + many[151:200]) + "\n")
    assert path.stat().st_size > 2 * formats.SEARCH_BYTES
    with pytest.raises(DataError) as refused:
        list_pieces(path, "jsonl")
    assert "changed from string to number" in str(refused.value) and "Unterminated" not in str(refused.value)


def test_csv_shards_read_requested_columns_as_text(tmp_path):
    """Each byte range is parsed alone: ids like 00123 and texts that look numeric stay text in
    every shard, whatever the other shards hold."""
    path = tmp_path / "c.csv"
    path.write_text("id,text\n" + "".join(f"{i:05d},{i * 7}\n" for i in range(40)))
    merged, specs = _read_all(str(path), 3)
    assert len(specs) > 5
    assert merged == {"id": [f"{i:05d}" for i in range(40)], "text": [str(i * 7) for i in range(40)]}


def test_a_file_without_a_configured_column_is_named_not_read_as_nulls(tmp_path):
    """The driver checks the first file's columns; pyarrow reads a later parquet file that lacks a
    requested column without one, so every row of it became a "null text" bad row, dropped without
    a word under bad_rows: skip. Each shard's file is checked where it is read; a jsonl row may
    still leave a key out (a null there)."""
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"id": ["b"], "body": ["y"]}), tmp_path / "part-1.parquet")
    specs = plan_shards(open_source(str(tmp_path), None), 10)
    assert read_shard(specs[0], ["id", "text"]).to_pylist() == [{"id": "a", "text": "x"}]
    with pytest.raises(DataError, match=r"part-1.parquet: has no column\(s\) \['text'\]; every file of the input "):
        read_shard(specs[1], ["id", "text"])
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text('{"id": "c"}\n')
    (spec,) = plan_shards(open_source(str(tmp_path / "j"), None), 10)
    assert read_shard(spec, ["id", "text"]).column_names == ["id"]  # the text a null, judged per row


@pytest.mark.parametrize("folder", [
    # (an s3 URI names its region: pyarrow would ask AWS for the bucket's otherwise)
    "s3://bucket/dir?region=eu-west-1", "s3://bucket/dir/?region=eu-west-1",
    "s3://bucket/dir?region=eu-west-1&endpoint_override=127.0.0.1:9&scheme=http",
    "abfs://acct.blob.core.windows.net/container/dir", "abfs://container@acct.dfs.core.windows.net/dir",
    "abfs://container@acct.dfs.core.windows.net/", "file:///data/dir", "s3://bucket/dir/*.parquet?region=eu-west-1",
    "s3://bucket?region=eu-west-1", "s3://KEY:SECRET@bucket/dir?region=eu-west-1&endpoint_override=127.0.0.1:9",
    "s3://bucket/my%20dir/?region=eu-west-1", "file:///data/a%25b%20c/*", "file:///*.parquet",
    "s3://KEY:se*cret@bucket/dir/*.parquet?region=eu-west-1",  # a wildcard character outside the path
])
def test_a_folders_files_keep_the_uris_account_and_options(folder):
    """A folder's (or glob's) files come back as paths inside its filesystem, without what the
    URI's authority and query hold (an Azure account, an S3 endpoint, keys), and decoded. Oracle:
    pyarrow's own parsing of each file's URI gives the folder's filesystem, with the same
    options, and that path, for names holding a space, "=", "#" or "%"."""
    import pyarrow.fs as pafs

    from raytrieve.data.files import with_scheme

    fs, root = pafs.FileSystem.from_uri(folder)
    inner = root.rstrip("/").rsplit("/", 1)[0] if "*" in root else root.rstrip("/")
    for path in (f"{inner}/part-0.parquet", f"{inner}/sub/part-1.parquet", f"{inner}/city=New York/a #1 %20.parquet"):
        member = with_scheme(folder, root, path)
        again, got = pafs.FileSystem.from_uri(member)
        assert got == path and again.equals(fs), member
    with pytest.raises(DataError, match=r"s3://buck\*/x\?region=eu-west-1: a wildcard in the bucket"):
        with_scheme("s3://buck*/x?region=eu-west-1", "buck*/x", "bucket/x")
