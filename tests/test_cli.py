"""The `ue` command's listing subcommands and its error reporting."""

from unified_embedding.cli import main
from unified_embedding.data import DATASETS
from unified_embedding.embeddings import METHODS


def test_datasets_lists_every_dataset_and_where_it_was_found(data_dir, tmp_path, capsys):
    assert main(["datasets", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    for name in DATASETS:
        assert name in out
    assert "not found" not in out
    assert str(data_dir / "movielens-100k") in out
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("not found") == len(DATASETS)


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in METHODS.items():
        assert name in out and cls.description in out


def test_unknown_dataset_and_bad_budget_are_one_line_errors(data_dir, tmp_path, capsys):
    assert main(["train", "--dataset", "nope", "--output", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    code = main(["train", "--dataset", "criteo", "--data-dir", str(data_dir), "--budget", "lots",
                 "--output", str(tmp_path / "r.json"), "--quiet"])  # fmt: skip
    assert code == 2 and "budget must be" in capsys.readouterr().err


def test_download_refuses_datasets_without_an_official_url(tmp_path, capsys):
    assert main(["datasets", "download", "avazu", "--data-dir", str(tmp_path)]) == 2
    assert "avazu" in capsys.readouterr().err


def test_method_options_read_true_and_false_as_booleans():
    from unified_embedding.cli import _option

    assert _option("shared=false") == ("shared", False)
    assert _option("shared=True") == ("shared", True)
    assert _option("probes=3") == ("probes", 3)
    assert _option("storage=int8") == ("storage", "int8")
