"""A reduced `make demo` through the very same code (raytrieve.demo.run_demo), with small sizes:
real docstrings, the shipped pretrained models, the Ray Data encoding job, Ray Train
fine-tuning tracked and registered in a real MLflow store, Serve loading the fine-tuned models
from the registry, real HTTP. Then the report's sanity, and a second run reusing every step."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest

from raytrieve.config import from_dict
from raytrieve.data import pydocs
from raytrieve.demo import DemoConfig, run_demo
from raytrieve.demo.report import TEST_STAGES
from raytrieve.errors import ConfigError, DataError
from raytrieve.serve.tuning import RERANK_WEIGHTS
from tests.conftest import free_port



def _config(tmp_path, port: int) -> DemoConfig:
    return from_dict(DemoConfig, {
        "out_dir": str(tmp_path / "demo"), "pydocs_dir": str(tmp_path / "pydocs"),
        "sample": {"train_pairs": 96, "dev_queries": 30, "dev_corpus": 120, "test_queries": 30, "test_corpus": 120},
        "models": {"max_seq_length": 64, "reranker_max_seq_length": 80},
        # A few steps at a high rate: enough to move the models.
        "dense_training": {"batch_size": 16, "learning_rate": 1e-4, "register_as": "t-dense"},
        "sparse_training": {"batch_size": 16, "learning_rate": 1e-4, "register_as": "t-sparse"},
        # Mined negatives from the 96 train pairs; a few steps of the 12-layer cross-encoder.
        "reranker_training": {"batch_size": 8, "max_steps": 2, "register_as": "t-cross"},
        "serving": {"port": port, "rerank_depth": 5, "recall": 100, "clients": 2},
        "fusion_fit": {"rerank_depths": [5]},
    }).check()


def test_demo_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="sample.test_corpus"):
        from_dict(DemoConfig, {"sample": {"test_queries": 50, "test_corpus": 10}}).check()
    with pytest.raises(ConfigError, match="dense_training.register_as"):
        from_dict(DemoConfig, {"dense_training": {"register_as": ""}}).check()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['queries'\]"):
        from_dict(DemoConfig, {"sample": {"queries": 5}})


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "jobs" / "configs"


def _leaves(node, prefix=""):
    """{"a.b": 1, "datasets.0.path": ...}: the keys a YAML sets, as overrides spell them."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def _at(dumped, key):
    for part in key.split("."):
        dumped = dumped[int(part)] if isinstance(dumped, list) else dumped[part]
    return dumped


def _phase_configs(cfg: DemoConfig) -> dict:
    from raytrieve.demo import phase_configs as pc

    out, m = cfg.out, cfg.models
    return {
        "dense_training": pc.train_config(cfg, "dense", cfg.dense_training, out / "data" / "train.parquet"),
        "sparse_training": pc.train_config(cfg, "sparse", cfg.sparse_training, out / "data" / "train.parquet"),
        "encode": pc.encode_config(cfg, out / "data" / "test_corpus.parquet", m.dense, m.sparse, out / "pretrained"),
        "serve": pc.serve_config(cfg, m.dense, m.sparse, out / "pretrained" / "index"),
        "mine": pc.mine_config(cfg, out / "data" / "train.parquet", m.dense, out / "mined" / "negatives.parquet"),
        "reranker_training": pc.train_config(cfg, "cross", cfg.reranker_training, out / "mined" / "negatives.parquet"),
    }


def test_demo_phase_configs_are_the_shipped_yamls_plus_overrides(tmp_path):
    """Every key a shipped YAML sets reaches the demo's phase config unless the demo overrides
    it; a value changed in the YAML (a copy of jobs/configs/) shows up in the demo's config."""
    import shutil

    import yaml

    cfg = DemoConfig(out_dir=str(tmp_path / "demo"))
    for phase, loaded in _phase_configs(cfg).items():
        assert loaded.source == SHIPPED / getattr(cfg.configs, phase)
        overridden = [item.split("=", 1)[0] for item in loaded.overrides]
        dumped = loaded.config.model_dump(mode="json")
        shipped = yaml.safe_load(loaded.source.read_text())
        for key, value in _leaves(shipped):
            if not any(key == o or key.startswith(o + ".") for o in overridden):
                assert _at(dumped, key) == value, (phase, key)
        # The demo's own settings are on top: paths into its out folder, its sizes.
        paths = [v for k, v in _leaves(dumped) if k in ("output_dir", "output_path", "index", "datasets.0.path")]
        assert paths and all(str(v).startswith(str(cfg.out)) for v in paths), (phase, paths)

    # A copy of the shipped configs with one key changed each: the demo reads the files.
    copy = tmp_path / "configs"
    shutil.copytree(SHIPPED, copy)
    changed = {
        "dense_mnrl.yaml": ("optimizer", "weight_decay", 0.125),
        "splade.yaml": ("checkpoint", "every_n_steps", 7),
        "encode_pydocs.yaml": ("compute", "token_budget", 1234),
        "serve_pydocs.yaml": ("reranker", "max_batch_tokens", 4321),
        "mine_pydocs.yaml": ("selection", "range_max", 25),
        "cross_mined.yaml": ("optimizer", "weight_decay", 0.125),
    }
    for name, (section, key, value) in changed.items():
        data = yaml.safe_load((copy / name).read_text())
        data[section][key] = value
        (copy / name).write_text(yaml.safe_dump(data))
    edited = from_dict(DemoConfig, {"out_dir": str(tmp_path / "demo"), "configs": {"dir": str(copy)}})
    phases = _phase_configs(edited)
    for (phase, loaded), (section, key, value) in zip(phases.items(), changed.values()):
        assert getattr(getattr(loaded.config, section), key) == value, phase

    # Saved with how it was made, and it loads back as the same config.
    from raytrieve.train.config import load_train_config

    saved = phases["dense_training"].save(tmp_path / "train_dense.yaml", "raytrieve train")
    assert f"# {copy / 'dense_mnrl.yaml'} with the demo's overrides:" in saved.read_text()
    assert load_train_config(saved) == phases["dense_training"].config


def test_demo_phase_config_errors_name_the_field(tmp_path):
    from raytrieve.demo.phase_configs import check_all

    out = str(tmp_path / "demo")
    with pytest.raises(ConfigError, match=r"configs\.dense_training: .*splade\.yaml trains a sparse model"):
        check_all(from_dict(DemoConfig, {"out_dir": out, "configs": {"dense_training": "splade.yaml"}}))
    with pytest.raises(ConfigError, match=r"configs\.encode: .*nope\.yaml not found; .*configs\.dir="):
        check_all(from_dict(DemoConfig, {"out_dir": out, "configs": {"encode": "nope.yaml"}}))
    # A demo setting the shipped config refuses: the message names the phase, the file, the key
    # and the override that set it.
    with pytest.raises(ConfigError, match=r"demo configs\.dense_training \(.*dense_mnrl\.yaml with the demo's "
                       r"overrides\): training\.epochs must be at least 1, got 0; the demo set training\.epochs=0"):
        check_all(from_dict(DemoConfig, {"out_dir": out, "dense_training": {"epochs": 0, "register_as": "x"}}))
    # A length past the model's 512 position embeddings, before any work: the key, the limit.
    with pytest.raises(ConfigError, match=r"demo models\.reranker_max_seq_length \(for ms-marco-minilm-l12-v2\): 600 is "
                       r"more than the 512 positions .*set it to at most 512"):
        check_all(from_dict(DemoConfig, {"out_dir": out, "models": {"reranker_max_seq_length": 600}}))
    check_all(from_dict(DemoConfig, {"out_dir": out, "models": {"reranker_max_seq_length": 512}}))


def test_demo_fit_scores_pairs_with_the_served_reranker_deployment(tiny_dirs, st, monkeypatch):
    """The dev fit's rerank scores come from the served reranker deployment's settings (here a
    max_seq_length of 8, far below the demo's models.reranker_max_seq_length, and float32), not the
    demo's own: every pair it scores equals sentence-transformers' CrossEncoder loaded with
    the deployment's settings, and those differ from the scores at the demo's length."""
    import numpy as np

    from raytrieve.demo import fusion_fit
    from raytrieve.demo.progress import Progress
    from raytrieve.demo.sample import Split
    from raytrieve.serve import tuning
    from raytrieve.serve.config import DeploymentConfig
    from tests.conftest import SENTENCES

    cross = tiny_dirs["cls1_spread"]

    corpus = {f"d{i}": text for i, text in enumerate(SENTENCES)}
    queries = {f"q{i}": SENTENCES[i].split(" is ")[0] + " doing something" for i in range(6)}
    qrels = {f"q{i}": {f"d{i}": 1.0} for i in range(6)}
    rng = np.random.default_rng(0)
    dev_result = {kind: {"candidates": {q: [(f"d{j}", float(10 - r)) for r, j in
                                            enumerate(rng.permutation(len(corpus))[:10])] for q in queries}}
                  for kind in ("dense", "sparse")}
    cfg = from_dict(DemoConfig, {"models": {"max_seq_length": 64, "reranker_max_seq_length": 128},
                                 "serving": {"recall": 10}, "fusion_fit": {"rerank_queries": 4, "rerank_depths": [5]}})
    spec = DeploymentConfig(model=str(cross), max_seq_length=8, dtype="float32")

    scored: list[tuple[list, list]] = []
    original = tuning.cross_scores

    def spy(candidates, setting, depth, qs, docs, score_pairs):
        def recorded(pairs):
            out = [float(v) for v in score_pairs(pairs)]
            scored.append((pairs, out))
            return out
        return original(candidates, setting, depth, qs, docs, recorded)

    monkeypatch.setattr(tuning, "cross_scores", spy)
    fit = fusion_fit.fit_on_dev(cfg, Split(queries, corpus, qrels), dev_result, spec, Progress(lambda line: None))
    assert set(fit["rerank_dev_ndcg@10"]) == {"0", "5"} | {f"5@{w:g}" for w in RERANK_WEIGHTS if w < 1}
    (pairs, got), = scored
    assert len(pairs) == 4 * 5
    ref = st.CrossEncoder(str(cross), device="cpu", max_length=8).predict(pairs)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    longer = st.CrossEncoder(str(cross), device="cpu", max_length=128).predict(pairs)
    assert np.abs(np.asarray(longer) - np.asarray(got)).max() > 0.05  # the length the fit used mattered


def test_demo_fit_uses_the_reranker_deployment_the_phase_serves(tmp_path):
    """The deployment the fit scores with is the one the phase's served config holds once the
    fit is in it: a shipped serve config's reranker dtype and trust_remote_code reach it, the
    demo's model and reranker_max_seq_length override it."""
    import shutil

    import yaml

    from raytrieve.demo import phase_configs as pc

    copy = tmp_path / "configs"
    shutil.copytree(SHIPPED, copy)
    shipped = yaml.safe_load((copy / "serve_pydocs.yaml").read_text())
    shipped["reranker"].update(dtype="bfloat16", trust_remote_code=True)
    (copy / "serve_pydocs.yaml").write_text(yaml.safe_dump(shipped))
    cfg = from_dict(DemoConfig, {"out_dir": str(tmp_path / "demo"), "configs": {"dir": str(copy)},
                                 "models": {"max_seq_length": 96, "reranker_max_seq_length": 200}})
    index = cfg.out / "fine-tuned" / "index"
    spec = pc.served_reranker(cfg, "models:/d/1", "models:/s/1", index, "models:/c/1")
    got = (spec.model, spec.max_seq_length, spec.dtype, spec.trust_remote_code)
    assert got == ("models:/c/1", 200, "bfloat16", True)
    fitted = {"rerank": True, "rerank_depth": 20, "recall": {"dense": 50}}
    served = pc.serve_config(cfg, "models:/d/1", "models:/s/1", index, fitted, "models:/c/1").config
    assert served.reranker == spec


def test_fitted_rerank_request_is_the_dev_best_rerank_unless_served():
    from raytrieve.demo.fusion_fit import rerank_request
    from raytrieve.serve.tuning import Setting

    fitted = Setting({"dense": 20, "sparse": 50}, {"method": "rrf", "k": 5.0})
    best = Setting(fitted.recall, fitted.fusion, 20, 0.3)
    # Not adopted: the served setting with the dev's best rerank (its recall and fusion are the
    # app's defaults, so only the rerank fields are sent).
    fit = {"setting": fitted.search_fields(), "with_rerank": {"setting": best.search_fields(), "label": best.label()}}
    assert rerank_request(fit, 10) == {"rerank": True, "rerank_depth": 20, "rerank_weight": 0.3}
    assert rerank_request({**fit, "setting": best.search_fields()}, 10) is None  # adopted: "fitted" reranks
    assert rerank_request({**fit, "with_rerank": None}, 10) == {"rerank": True, "rerank_depth": 10, "rerank_weight": 1.0}
    assert rerank_request(None, 7) == {"rerank": True, "rerank_depth": 7, "rerank_weight": 1.0}


def test_pydocs_packages_scanned_in_parallel_equal_one_process():
    packages = ("click", "jinja2", "packaging")
    assert pydocs.scan_packages(packages, workers=2) == {p: pydocs.package_pairs(p) for p in packages}


def test_pydocs_summary_is_the_first_sentence_however_it_wraps():
    """The query is a docstring's first sentence: the first physical line cut wrapped summaries
    mid-sentence and opened the document with the rest of the sentence."""
    wrapped = """Return a copy of each string element where all tab characters are
    replaced by one or more spaces.

    Parameters
    ----------
    tabsize : int"""
    assert pydocs.split_summary(wrapped) == (
        "Return a copy of each string element where all tab characters are replaced by one or more spaces.",
        "Parameters ---------- tabsize : int",
    )
    # The first sentence ends mid-paragraph; "e.g. the" does not end it.
    assert pydocs.split_summary("Sum the values, e.g. the\ncounts. Then more.\n\nNotes here.") == (
        "Sum the values, e.g. the counts.",
        "Then more. Notes here.",
    )
    # A paragraph without an end is the summary whole; one line ending in a period is PEP 257's.
    assert pydocs.split_summary("Show what NumPy was built\nwith and is using\n\nMore.") == (
        "Show what NumPy was built with and is using",
        "More.",
    )
    assert pydocs.split_summary("Do it.\nDetails follow here.") == ("Do it.", "Details follow here.")
    # A first paragraph that is the object's signature gives way to the next.
    signature = "chararray(shape, itemsize=1,\n    order=None)\n\nProvides a view on arrays. Then more."
    assert pydocs.split_summary(signature, "chararray") == ("Provides a view on arrays.", "Then more.")
    assert pydocs.split_summary(" ".join(["word"] * 65)) is None
    assert pydocs.split_summary("chararray(x)", "chararray") is None
    # The summary ends where the structure begins: a Google section, a reST field or directive, a
    # doctest, a numpydoc section (a header over its underline); a docstring opening with one has none.
    assert pydocs.split_summary("Compute foo\nArgs:\n    x (int): The value.") == ("Compute foo", "Args: x (int): The value.")
    assert pydocs.split_summary("Compute foo\n:param x: the value") == ("Compute foo", ":param x: the value")
    assert pydocs.split_summary("Compute foo\n>>> foo(1)") == ("Compute foo", ">>> foo(1)")
    assert pydocs.split_summary("Compute foo\nReturns\n-------\nint") == ("Compute foo", "Returns ------- int")
    for opening in ("Parameters\n----------\nx : int\n    The input.", ".. deprecated:: 2.0\n    Use bar instead.",
                    "Args:\n    x: the value of it all", "mask (`Tensor` of shape `(n,)`, *optional*):\n    Mask to avoid it."):
        assert pydocs.split_summary(opening) is None, opening
    # Abbreviations and closing quotes or brackets.
    assert pydocs.split_summary("Cast the array, e.g. `float32` to `int8`. More.")[0] == (
        "Cast the array, e.g. `float32` to `int8`.")
    assert pydocs.split_summary('Set the mode to "fast." Then more.') == ('Set the mode to "fast."', "Then more.")
    # A paragraph that only starts with the name is prose, not a signature.
    assert pydocs.split_summary("Dataset (a table of rows) is the main class.", "Dataset")[0] == (
        "Dataset (a table of rows) is the main class.")
    assert pydocs.split_summary("Mean (raw first moment about the origin)\n\nMore.")[0] == (
        "Mean (raw first moment about the origin)")


def test_pydocs_summary_leaves_out_what_is_not_its_words():
    """Rules 3: a signature line atop the words (torch's "name(...) -> Tensor", numpy's C text
    signature ending in "--"), a note's title, an attribute's type, reST's "::" and a stray quote
    were in queries; "(e.g." ended a sentence."""
    assert pydocs.split_summary("hann_window(window_length, *, dtype=None) -> Tensor\n"
                                "Hann window function.\n\nArgs: more") == ("Hann window function.", "Args: more")
    assert pydocs.split_summary("add(x1, x2, /, out=None)\n--\n\nAdd arguments element-wise.\n\nMore.") == (
        "Add arguments element-wise.", "More.")
    assert pydocs.split_summary("print(format_str, *args) -> None") is None
    assert pydocs.split_summary("Note [DDPOptimizer]\nDDPOptimizer applies when dynamo compiles. More.") == (
        "DDPOptimizer applies when dynamo compiles.", "More.")
    assert pydocs.split_summary("[Note: Inductor op] Bucketize the inputs here. More.")[0] == (
        "Bucketize the inputs here.")
    assert pydocs.split_summary("(c_intp*self.ndim): A ctypes array of length ndim. More.")[0] == (
        "A ctypes array of length ndim.")
    assert pydocs.split_summary('{None, "no_cache"}: Specifies the extent of caching.')[0] == (
        "Specifies the extent of caching.")
    assert pydocs.split_summary('" Is this expression an integer.')[0] == "Is this expression an integer."
    assert pydocs.split_summary("Unwraps a functorch tensor (e.g. BatchedTensor) into a tensor. More.")[0] == (
        "Unwraps a functorch tensor (e.g. BatchedTensor) into a tensor.")
    assert pydocs.split_summary("Force a graph break on them. ::\n\n    code")[0] == "Force a graph break on them."
    assert pydocs.split_summary("Return marks for a function, applied::\n\n    code")[0] == (
        "Return marks for a function, applied:")


def test_pydocs_limit_is_the_first_pairs_of_the_whole_scan():
    whole = pydocs.package_pairs("tqdm")
    assert len(whole) > 30
    for limit in (1, 30, len(whole), len(whole) + 5):
        assert pydocs.package_pairs("tqdm", limit=limit) == whole[:limit]


def test_pydocs_build_replaces_its_own_output_and_nothing_else(tmp_path):
    """build-pydocs writes its folder whole: it refuses a folder of other files and a file
    (they were replaced, and the command reported success), and a limit below 1."""
    from raytrieve.errors import DataError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*data: the folder holds other files \(keep\.txt\)"):
        pydocs.build(tmp_path / "data", train_packages=("click",), test_packages=("packaging",), max_per_package=3)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["keep.txt"]
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*afile: is a file"):
        pydocs.build(tmp_path / "afile", train_packages=("click",), test_packages=("packaging",), max_per_package=3)
    for bad in (0, -5):
        with pytest.raises(DataError, match=rf"--max-per-package must be at least 1, got {bad}"):
            pydocs.build(tmp_path / "new", max_per_package=bad)
    with pytest.raises(DataError, match=r"dev package\(s\) \['no_such_pkg'\] not installed here; .*--dev-packages"):
        pydocs.build(tmp_path / "new", train_packages=("click",), dev_packages=("yaml", "no_such_pkg"))
    with pytest.raises(DataError, match=r"\['click'\] named as both train and dev packages"):
        pydocs.build(tmp_path / "new", train_packages=("click",), dev_packages=("yaml", "click"))
    small = {"train_packages": ("click", "jinja2"), "dev_packages": ("yaml",), "test_packages": ("packaging",),
             "max_per_package": 10}
    first = pydocs.build(tmp_path / "new", **small)
    assert pydocs.build(tmp_path / "new", **small) == first  # its own earlier output is replaced
    assert first["rows"]["train"] == 20 and first["rows"]["test"] == 10 and 0 < first["rows"]["dev"] <= 10
    assert first["dev_packages"] == ["yaml"] and first["packages"]["yaml"] == importlib.metadata.version("pyyaml")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(["manifest.json", *first["files"]])


def test_build_pydocs_command_takes_each_splits_packages(tmp_path, capsys):
    """`raytrieve data build-pydocs --dev-packages ...`: a split's packages from the command line
    (a build refuses a package that is not installed and names the flag)."""
    from raytrieve.cli import main

    out = tmp_path / "p"
    assert main(["data", "build-pydocs", "--out", str(out), "--train-packages", "click,jinja2",
                 "--dev-packages", " yaml ", "--test-packages", "packaging", "--max-per-package", "5"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert (built["train_packages"], built["dev_packages"], built["test_packages"]) == (
        ["click", "jinja2"], ["yaml"], ["packaging"])
    assert json.loads((out / "manifest.json").read_text()) == built


def test_pydocs_splits_share_no_query_or_document(tmp_path, monkeypatch):
    """Test drops what training saw; dev drops what training or test saw (pandas copies numpy's
    docstrings): a setting fitted on dev must not have seen a test query."""
    P = pydocs.Pair
    scanned = {"a": [P(f"train query {i}", f"train doc {i}", "a") for i in range(4)] + [P("shared query", "doc a", "a")],
               "b": [P("dev query", "dev doc", "b"), P("shared query", "doc b", "b"), P("test query x", "doc x", "b")],
               "c": [P("shared query", "doc c", "c"), P("test query x", "doc x", "c"), P("test only", "doc t", "c")]}
    monkeypatch.setattr(pydocs, "scan_packages", lambda packages: {p: scanned[p] for p in packages})
    monkeypatch.setattr(pydocs, "_version", lambda package: "1")
    monkeypatch.setattr(pydocs.importlib.util, "find_spec", lambda package: object())  # "installed"
    built = pydocs.build(tmp_path / "d", train_packages=("a",), dev_packages=("b",), test_packages=("c",))
    assert built["rows"] == {"train": 5, "dev": 1, "test": 2}
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "d" / "dev.parquet").column("query").to_pylist() == ["dev query"]
    assert pq.read_table(tmp_path / "d" / "test.parquet").column("query").to_pylist() == ["test query x", "test only"]


def _beir(root: Path, corpus: int = 40) -> Path:
    """A BEIR folder with BEIR's quirks: ids that look like integers, empty and missing titles,
    queries with two relevant documents, judged-irrelevant rows (grade 0), graded relevance."""
    root.mkdir(parents=True)
    docs = [{"_id": str(100 + i), "title": "" if i % 3 else f"Title {i}", "text": f"document number {i} text"}
            for i in range(corpus)]
    del docs[1]["title"]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"{i}", "text": f"question {i}"} for i in range(30)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir()
    splits = {"train": range(0, 14), "dev": range(14, 22), "test": range(22, 30)}
    for name, ids in splits.items():
        rows = ["query-id\tcorpus-id\tscore"]
        for q in ids:
            rows += [f"{q}\t{100 + q}\t2", f"{q}\t{101 + q}\t1", f"{q}\t{102 + q}\t0"]
        (root / "qrels" / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_a_beir_folder_gives_train_pairs_and_graded_dev_and_test_splits(tmp_path, monkeypatch):
    from raytrieve.demo.sample import prepare_beir
    from raytrieve.evaluate.data import load_beir

    folder = _beir(tmp_path / "mine")
    cfg = from_dict(DemoConfig, {"out_dir": str(tmp_path / "out"), "beir": {"path": str(folder)},
                                 "sample": {"train_pairs": 20, "dev_queries": 5, "dev_corpus": 12,
                                            "test_queries": 6, "test_corpus": 15}}).check()
    samples = prepare_beir(cfg, tmp_path / "out" / "data")
    import pyarrow.parquet as pq

    # A path under ~ reads the same folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    home = cfg.model_copy(update={"beir": cfg.beir.model_copy(update={"path": "~/mine"})})
    assert prepare_beir(home, tmp_path / "home").test.qrels == samples.test.qrels

    # Train pairs: a train query with a relevant (grade > 0) document of its own, 20 of the 28:
    # whole queries, each with both its relevant documents.
    train = pq.read_table(samples.train_path).to_pylist()
    assert samples.train_pairs == len(train) == 20
    per_query = {r["query"]: 0 for r in train}
    for r in train:
        per_query[r["query"]] += 1
    assert set(per_query.values()) == {2}
    assert len({(r["query"], r["document"]) for r in train}) == 20
    def text(i: int) -> str:  # a document as evaluate reads it: its title (if any) in front
        return ("" if i % 3 else f"Title {i} ") + f"document number {i} text"

    for r in train:
        q = int(r["query"].split()[-1])
        assert q < 14 and r["document"] in (text(q), text(q + 1)), r
    assert any(r["document"].startswith("Title ") for r in train)
    for split, name, n, size in ((samples.dev, "dev", 5, 12), (samples.test, "test", 6, 15)):
        full = load_beir(folder, name)
        assert len(split.queries) == n and set(split.queries) <= set(full.queries)
        assert len(split.corpus) == size
        for q, judged in split.qrels.items():
            # Graded as the file says; every relevant document is in the sampled corpus.
            assert judged == {d: g for d, g in full.qrels[q].items() if d in split.corpus}
            assert sorted(g for g in judged.values() if g > 0) == [1.0, 2.0]
        assert {split.queries[q] for q in split.qrels} == {full.queries[q] for q in split.qrels}
    # The encoding job's input is the test split's corpus, titles in front as evaluate reads them.
    corpus = pq.read_table(samples.test_corpus_path).to_pydict()
    assert dict(zip(corpus["id"], corpus["document"])) == samples.test.corpus
    # The same draw again; a changed qrels file changes the samples' key (no stale reuse).
    again = prepare_beir(cfg, tmp_path / "out" / "data")
    assert again.key == samples.key and again.test.qrels == samples.test.qrels
    (folder / "qrels" / "test.tsv").write_text((folder / "qrels" / "test.tsv").read_text() + "29\t100\t1\n")
    assert prepare_beir(cfg, tmp_path / "out" / "data").key != samples.key


def test_a_beir_folder_without_a_dev_split_holds_out_train_queries(tmp_path):
    """BEIR sets such as SciFact ship train and test only: with beir.dev_split unset the demo
    holds out train queries (at most a quarter) as dev, and trains on the rest only."""
    import pyarrow.parquet as pq

    from raytrieve.demo.report import markdown
    from raytrieve.demo.sample import prepare_beir

    folder = _beir(tmp_path / "mine")
    (folder / "qrels" / "dev.tsv").unlink()
    cfg = from_dict(DemoConfig, {"out_dir": str(tmp_path / "out"), "beir": {"path": str(folder)},
                                 "sample": {"train_pairs": 100, "dev_queries": 5, "dev_corpus": 12,
                                            "test_queries": 6, "test_corpus": 15}}).check()
    samples = prepare_beir(cfg, tmp_path / "out" / "data")
    assert samples.dev_note == "train queries held out from training (of 14)"
    held = set(samples.dev.qrels)
    assert len(held) == 3 and held <= {str(q) for q in range(14)}  # 14 // 4: a quarter of the train queries
    trained = {r["query"] for r in pq.read_table(samples.train_path).to_pylist()}
    assert trained == {f"question {q}" for q in range(14) if str(q) not in held}  # never trained on dev
    assert samples.train_pairs == 2 * 11
    for q, judged in samples.dev.qrels.items():  # graded as train.tsv says, relevant documents in the corpus
        file = {str(100 + int(q)): 2.0, str(101 + int(q)): 1.0, str(102 + int(q)): 0.0}
        assert {d: g for d, g in file.items() if g > 0} == {d: g for d, g in judged.items() if g > 0}
        assert judged.items() <= file.items() and set(judged) <= set(samples.dev.corpus)
    rep = json.loads((ROOT / "docs" / "demo-results.json").read_text())
    rep["data"] = {"beir": cfg.beir.model_dump(), "dev_note": samples.dev_note}
    assert f"{rep['sizes']['dev_queries']} train queries held out from training (of 14) over" in markdown(rep)

    # A dev split named but missing is still an error; a folder's own dev.tsv is used when there.
    named = cfg.model_copy(update={"beir": cfg.beir.model_copy(update={"dev_split": "dev"})})
    with pytest.raises(DataError, match=r"beir.dev_split: .*dev.tsv: no such file.*leave beir.dev_split unset"):
        prepare_beir(named, tmp_path / "named")
    own = _beir(tmp_path / "own")
    assert prepare_beir(cfg.model_copy(update={"beir": cfg.beir.model_copy(update={"path": str(own)})}),
                        tmp_path / "own-out").dev_note is None
    # dev.tsv taken as the test split: not also the dev split; train queries are held out instead.
    as_test = cfg.beir.model_copy(update={"path": str(own), "test_split": "dev"})
    samples = prepare_beir(cfg.model_copy(update={"beir": as_test}), tmp_path / "as-test")
    assert samples.dev_note is not None and set(samples.test.qrels) <= {str(q) for q in range(14, 22)}


def test_beir_pairs_command_writes_every_relevant_pair_for_raytrieve_train(tmp_path, capsys):
    import pyarrow.parquet as pq

    from raytrieve.cli import main

    folder = _beir(tmp_path / "mine")

    def text(i: int) -> str:  # a document as evaluate reads it: its title (if any) in front
        return ("" if i % 3 else f"Title {i} ") + f"document number {i} text"

    # Every train query (0-13) with both its relevant documents (grades 2 and 1, not the 0).
    out = tmp_path / "pairs" / "train.parquet"
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(out), "pairs": 28, "queries": 14, "split": "train", "judged_without_relevant": 0}
    rows = {(r["query"], r["document"]) for r in pq.read_table(out).to_pylist()}
    assert rows == {(f"question {q}", text(q + k)) for q in range(14) for k in (0, 1)}
    assert pq.read_schema(out).names == ["query", "document"]
    # A rerun replaces its own earlier output; a file it did not write is refused, untouched.
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    theirs = tmp_path / "theirs.parquet"
    theirs.write_bytes(out.read_bytes().replace(b"raytrieve data beir-pairs", b"someone else's file!!!!!"))
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(theirs)]) == 2
    assert "theirs.parquet: the file exists and is not an earlier output of raytrieve data beir-pairs" in (
        capsys.readouterr().err)
    assert b"someone else's file" in theirs.read_bytes()

    # Capped: whole queries, and the same pairs the BEIR demo trains on at that cap and seed.
    capped = tmp_path / "capped.parquet"
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(capped), "--max-pairs", "9"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 8
    from raytrieve.demo.sample import prepare_beir

    cfg = from_dict(DemoConfig, {"out_dir": str(tmp_path / "out"), "beir": {"path": str(folder)},
                                 "sample": {"train_pairs": 9, "seed": 42}}).check()
    assert pq.read_table(capped).equals(pq.read_table(prepare_beir(cfg, tmp_path / "out" / "data").train_path))

    # Errors name the flag and the fix; nothing is written.
    bad = tmp_path / "bad.parquet"
    assert main(["data", "beir-pairs", "--beir", str(folder), "--split", "validation", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "qrels/validation.tsv" in err and "['dev', 'test', 'train']" in err and "--split" in err
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(tmp_path / "pairs.jsonl")]) == 2
    assert "name a .parquet file" in capsys.readouterr().err
    assert main(["data", "beir-pairs", "--beir", str(tmp_path / "nowhere"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrieve data beir-pairs: error: ") and "nowhere: no such folder; --beir takes" in err
    assert main(["data", "beir-pairs", "--beir", str(folder), "--out", str(bad), "--max-pairs", "1"]) == 2
    assert "no query of train fits in --max-pairs 1 with all its relevant documents" in capsys.readouterr().err
    assert not bad.exists()


def test_whole_query_pairs_skip_a_query_past_the_cap_and_take_a_smaller_one():
    import numpy as np

    from raytrieve.data.beir import whole_query_pairs

    qrels = {"a": {"d1": 1.0, "d2": 2.0, "d3": 1.0}, "b": {"d4": 1.0, "d5": 0.0}, "c": {"d6": 1.0, "d7": 1.0}}
    assert whole_query_pairs(qrels, None, None) == [("a", "d1"), ("a", "d2"), ("a", "d3"), ("b", "d4"),
                                                   ("c", "d6"), ("c", "d7")]
    # By id: a (3 pairs) fits 4, c (2) would pass it and is skipped; b (1) fills it.
    assert whole_query_pairs(qrels, 4, None) == [("a", "d1"), ("a", "d2"), ("a", "d3"), ("b", "d4")]
    assert whole_query_pairs(qrels, 2, None) == [("b", "d4")]  # a skipped, b taken, c would pass 2
    drawn = whole_query_pairs(qrels, 3, np.random.default_rng(0))
    per_query = {q for q, _ in drawn}
    assert len(drawn) <= 3 and all(len([p for p in drawn if p[0] == q]) == len([g for g in qrels[q].values() if g > 0])
                                   for q in per_query)


def test_beir_data_errors_name_the_split_and_the_fix(tmp_path):
    from raytrieve.demo.sample import prepare_beir
    from raytrieve.errors import DataError

    folder = _beir(tmp_path / "mine")

    def prepared(**beir):
        return prepare_beir(from_dict(DemoConfig, {"out_dir": str(tmp_path / "out"),
                                                   "beir": {"path": str(folder), **beir}}), tmp_path / "out")

    with pytest.raises(DataError, match=r"beir.dev_split: .*validation.tsv: no such file.*\['dev', 'test', 'train'\]\. "
                                        r"Set beir.dev_split=<one of them>"):
        prepared(dev_split="validation")
    with pytest.raises(DataError, match="beir: the train, dev and test splits must differ"):
        prepared(dev_split="test")
    shared = (folder / "qrels" / "train.tsv").read_text() + "25\t105\t1\n"
    (folder / "qrels" / "train.tsv").write_text(shared)
    with pytest.raises(DataError, match=r"beir.test_split: 1 of its queries are also in the train split \(e.g. \['25'\]\)"):
        prepared()
    (folder / "qrels" / "train.tsv").write_text(shared.rsplit("25\t", 1)[0])
    (folder / "qrels" / "dev.tsv").write_text((folder / "qrels" / "dev.tsv").read_text() + "23\t104\t1\n")
    with pytest.raises(DataError, match=r"beir.test_split: 1 of its queries are also in the dev split"):
        prepared()
    with pytest.raises(DataError, match=r"beir.path: .*nowhere: no such folder"):
        prepared(path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="beir: missing required key .path."):
        from_dict(DemoConfig, {"beir": {"train_split": "train"}})


def test_the_report_says_which_data_it_scored():
    from raytrieve.demo.report import markdown

    rep = json.loads((ROOT / "docs" / "demo-results.json").read_text())
    assert "queries of numpy and scipy docstrings" in markdown(rep)
    # The packages are the run's own (its data folder's manifest), not this version's defaults.
    rep["data"] = {"pydocs": {"rules": 3, "train_packages": ["click"], "dev_packages": ["yaml", "tqdm"],
                              "test_packages": ["fsspec"]}}
    md = markdown(rep)
    assert "queries of fsspec docstrings (packages never trained on)" in md and "numpy" not in md
    assert "queries of yaml and tqdm docstrings (packages neither trained on nor tested) over" in md
    rep["data"] = {"beir": {"path": "data/mine", "train_split": "train", "dev_split": "dev", "test_split": "test"}}
    md = markdown(rep)
    assert "queries of data/mine's test split (never trained on)" in md and "numpy" not in md
    assert f"{rep['sizes']['dev_queries']} queries of its dev split over" in md


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reduced_demo_end_to_end(ray_cluster, tmp_path):
    # Small real-docstring data: packages that are always installed with raytrieve's dependencies.
    pydocs.build(tmp_path / "pydocs", train_packages=("pydantic", "jinja2", "click"), dev_packages=("pygments", "aiohttp"),
                 test_packages=("fsspec", "requests", "urllib3", "packaging"))
    cfg = _config(tmp_path, free_port(pair=True))
    lines: list[str] = []
    result = run_demo(cfg, log=lines.append, ray_address=None)
    rep = result.report

    # Every stage and metric is there, with sane values.
    rows = {(r["split"], r["stage"]): r for r in rep["rows"]}
    assert set(rows) == {("test", s) for s in TEST_STAGES} | {("dev", "dense"), ("dev", "sparse")}
    assert rep["metrics"] == ["ndcg@10", "mrr@10", "recall@100"]
    for row in rows.values():
        for m, v in row["metrics"].items():
            assert 0.0 <= v["before"] <= 1.0 and 0.0 <= v["after"] <= 1.0, (row["label"], m, v)
            assert v["ci95"][0] <= v["delta"] <= v["ci95"][1]
        for phase in ("before", "after"):
            # One relevant document: MRR@10 <= NDCG@10 <= Recall@10 <= Recall@100.
            assert row["metrics"]["mrr@10"][phase] <= row["metrics"]["ndcg@10"][phase] + 1e-12
            assert row["metrics"]["ndcg@10"][phase] <= row["metrics"]["recall@100"][phase] + 1e-12
    # The pretrained models find most known items: this is retrieval, not noise.
    assert rows[("test", "dense")]["metrics"]["mrr@10"]["before"] > 0.4
    assert rows[("test", "hybrid+rerank")]["metrics"]["recall@100"]["before"] > 0.9

    # Fine-tuned >= pretrained on dev (packages neither trained on nor tested):
    # no significant loss, i.e. the 95% interval of the paired difference reaches 0 or above.
    for kind in ("dense", "sparse"):
        ndcg = rows[("dev", kind)]["metrics"]["ndcg@10"]
        assert ndcg["ci95"][1] >= 0.0, (kind, ndcg)
    # The fine-tuned model really is another model: some query ranks its document differently.
    assert any(rows[("dev", k)]["metrics"]["ndcg@10"]["delta"] != 0.0 for k in ("dense", "sparse"))
    # The rerank stage puts the hybrid's top 5 in the cross-encoder's order, recomputed here in
    # process at the served length and dtype: a broken stage (scores misaligned with documents,
    # order reversed) fails this. Whether that order is better is the report's figure, not a
    # test's: on docstrings the MS MARCO model is below dense (docs/demo-results.md; here too).
    import pyarrow.parquet as pq

    from raytrieve.encoders import load_encoder
    from raytrieve.model_ref import resolve_model

    rows = pq.read_table(tmp_path / "pydocs" / "test.parquet").to_pydict()
    query_of = {f"q-{i}": q for i, q in zip(rows["id"], rows["query"])}
    doc_of = dict(zip(rows["id"], rows["document"]))
    top10 = json.loads((cfg.out / "stages" / "test-pretrained.json").read_text())["result"]["top10"]
    dtype = rep["served_models"]["before"]["ms-marco-minilm-l12-v2"]["dtype"]
    oracle = load_encoder("cross", str(resolve_model("ms-marco-minilm-l12-v2")), max_seq_length=80, dtype=dtype)
    # bf16: logits near -11 are 0.0625 apart, and the replica's batches pad otherwise than these;
    # a reversed or misaligned order is off by whole units.
    tol = 1e-4 if dtype == "float32" else 0.5
    assert len(top10["hybrid"]) == len(top10["hybrid+rerank"]) == 30
    for qid in sorted(top10["hybrid"])[:8]:
        head = top10["hybrid+rerank"][qid][:5]
        assert set(head) == set(top10["hybrid"][qid][:5]) and top10["hybrid+rerank"][qid][5:] == top10["hybrid"][qid][5:]
        scores = oracle.predict([(query_of[qid], doc_of[d]) for d in head])
        assert all(a >= b - tol for a, b in zip(scores, scores[1:])), (qid, head, scores)
    for key, v in rep["rerank_vs_single_stage_ndcg@10"].items():
        assert v["ci95"][0] <= v["delta"] <= v["ci95"][1], (key, v)

    # /search's settings fitted on dev per phase: the served app's search: defaults are the fit,
    # the fit is at least the untuned RRF on dev (it is one of the settings tried), and its test
    # row is compared with every stage.
    import yaml

    for phase, name in (("before", "pretrained"), ("after", "fine-tuned")):
        fit = rep["fitted_search"][phase]
        assert fit["dev_ndcg@10"]["fitted_fusion"] >= fit["dev_ndcg@10"]["rrf_default"]
        assert set(fit["rerank_dev_ndcg@10"]) == {"0", "5"} | {f"5@{w:g}" for w in RERANK_WEIGHTS if w < 1}
        served = yaml.safe_load((cfg.out / "configs" / f"serve_{name}.yaml").read_text())["search"]
        assert {k: served[k] for k in fit["setting"]} == {
            k: ({**served[k], **v} if isinstance(v, dict) else v) for k, v in fit["setting"].items()}
        for stage in ("dense", "sparse", "hybrid", "hybrid+rerank", "best_single"):
            v = rep["fitted_vs_stage_ndcg@10"][f"{phase}:{stage}"]
            assert v["ci95"][0] <= v["delta"] <= v["ci95"][1]
        # "fitted+rerank" reranks the fitted ranking's head (depth 5, the only one tried): per
        # query the same pool as "fitted" (Recall@100), and its own order only in the top 5.
        chosen = fit["with_rerank"]["setting"]
        key = f"{chosen['rerank_depth']}" + (f"@{chosen['rerank_weight']:g}" if chosen["rerank_weight"] < 1 else "")
        assert chosen["rerank_depth"] == 5 and fit["rerank_dev_ndcg@10"][key] == max(
            v for k, v in fit["rerank_dev_ndcg@10"].items() if k != "0")
        per_stage = json.loads((cfg.out / "stages" / f"test-{name}.json").read_text())["result"]["per_stage"]
        assert per_stage["fitted+rerank"]["recall@100"] == per_stage["fitted"]["recall@100"]
        if fit["setting"]["rerank"]:  # adopted: the fitted ranking is already the reranked one
            assert per_stage["fitted+rerank"]["ndcg@10"] == per_stage["fitted"]["ndcg@10"]
        for stage in ("dense", "sparse", "hybrid", "fitted", "best_single"):
            v = rep["fitted_rerank_vs_stage_ndcg@10"][f"{phase}:{stage}"]
            assert v["ci95"][0] <= v["delta"] <= v["ci95"][1]
    md = result.markdown_path.read_text()
    assert "queries of pygments and aiohttp docstrings (packages neither trained on nor tested)" in md
    assert "fitted on the dev split" in md and "reranked at the depth and weight that scored best on dev" in md

    # Served from the MLflow registry, runs recorded there.
    assert rep["models"]["fine_tuned"] == {"dense": "models:/t-dense/1", "sparse": "models:/t-sparse/1",
                                           "cross": "models:/t-cross/1"}
    # The fine-tuned phase served the fine-tuned reranker, trained on the mined n-tuples.
    import pyarrow.parquet as pq

    mined = pq.read_table(cfg.out / "mined" / "train_hard_negatives.parquet")
    assert mined.column_names == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    assert 0 < mined.num_rows <= 96
    for row in mined.slice(0, 20).to_pylist():  # a positive is never its own query's negative
        assert row["positive"] not in (row["negative_1"], row["negative_2"], row["negative_3"])
    served = yaml.safe_load((cfg.out / "configs" / "serve_fine-tuned.yaml").read_text())
    assert served["reranker"]["model"] == "models:/t-cross/1"
    from raytrieve.tracking import mlflow_run

    client = mlflow_run.client(cfg.tracking_uri())
    for run_id in rep["mlflow"]["runs"].values():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    assert any("mlflow ui --backend-store-uri " + cfg.tracking_uri() in line for line in lines)

    # The written report: markdown with every row, a real PNG, report.json.
    md = result.markdown_path.read_text()
    assert all(f"| {r['split']} | {r['label']} |" in md for r in rep["rows"]) and "Lee corpus" in md
    assert result.chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((cfg.out / "report.json").read_text())["rows"] == rep["rows"]
    assert any("4/6 fine-tuning" in line for line in lines)
    # What each phase's replicas ran, read from /v1/models: the config's dtype auto resolved on the
    # replica to a concrete format, the demo's torch threads, the fine-tuned models after.
    for phase, reranker in (("before", "ms-marco-minilm-l12-v2"), ("after", "models:/t-cross/1")):
        on_serve = rep["served_models"][phase]
        assert sorted(m["kind"] for m in on_serve.values()) == ["dense", "reranker", "sparse"], on_serve
        assert on_serve[reranker]["kind"] == "reranker"
        # The reranker reads its own length; the retrievers the demo's.
        assert [m["max_seq_length"] for m in on_serve.values() if m["kind"] == "reranker"] == [80], on_serve
        assert {m["max_seq_length"] for m in on_serve.values() if m["kind"] != "reranker"} == {64}, on_serve
        for m in on_serve.values():
            assert m["dtype"] in ("float32", "bfloat16") and m["torch_threads"] == cfg.serving.torch_threads, m
        # serve_pydocs.yaml's output caches (the second and third request per query reuse them).
        assert {m["kind"]: m["cache_entries"] for m in on_serve.values()} == {
            "dense": 10000, "sparse": 10000, "reranker": 50000}, on_serve
        assert f"Served {phase}: " in md

    # Each phase ran the shipped config with the demo's overrides, saved where the demo writes:
    # a key only the shipped YAML sets (checkpoint.every_n_steps) is in the trained config.
    from raytrieve.config import load_yaml
    from raytrieve.train.config import TrainConfig

    for kind, name in (("dense", "dense_mnrl.yaml"), ("sparse", "splade.yaml")):
        saved = cfg.out / "configs" / f"train_{kind}.yaml"
        assert saved.read_text().startswith(f"# {SHIPPED / name} with the demo's overrides:")
        trained, shipped = load_yaml(TrainConfig, saved), load_yaml(TrainConfig, SHIPPED / name)
        assert trained.checkpoint == shipped.checkpoint and trained.checkpoint.every_n_steps == 200
        assert trained.training.batch_size == 16 and trained.datasets[0].loss == shipped.datasets[0].loss
    # The reranker trains at the demo's length; only Serve reads its own (80, above).
    assert load_yaml(TrainConfig, cfg.out / "configs" / "train_cross.yaml").model.max_seq_length == 64
    assert {p.name for p in (cfg.out / "configs").iterdir()} == {
        f"{job}_{phase}.yaml" for job in ("encode", "serve") for phase in ("pretrained", "fine-tuned")
    } | {"train_dense.yaml", "train_sparse.yaml", "train_cross.yaml", "mine.yaml"}

    # A second run reuses every step: no encoding, training or serving again.
    lines.clear()
    t = time.monotonic()
    again = run_demo(cfg, log=lines.append, ray_address=None)
    assert time.monotonic() - t < 60
    assert again.report["rows"] == rep["rows"]
    # 2 in-process, 2 fits, 2 platform, 3 trainings, 1 mining
    assert sum("reused" in line for line in lines) == 10, lines
    assert len(again.report["reused_steps"]) == 10 and "reusing 10 finished steps" in again.markdown_path.read_text()


def test_shipped_demo_yaml_is_the_default_config():
    """`make demo` and a bare `raytrieve demo` run the same sizes (the ones docs/demo-results.md was measured with)."""
    from raytrieve.demo import load_demo_config

    shipped = load_demo_config(SHIPPED / "demo.yaml")
    assert shipped.model_dump() == DemoConfig().model_dump()
    measured = json.loads((ROOT / "docs" / "demo-results.json").read_text())
    assert measured["sizes"]["test_queries"] == shipped.sample.test_queries
    assert measured["sizes"]["train_pairs"] == shipped.sample.train_pairs
