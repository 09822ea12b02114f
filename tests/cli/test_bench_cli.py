import pytest

from ditkit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_writes_table_csv_and_plot(tmp_path, capsys):
    code = main(["bench", "--models", "DiT-Nano/4", "--mixers", "full", "clear", "--mixer-opt", "radius=2",
                 "--resolutions", "32", "64", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "DiT-Nano/4 + clear radius=2" in out and "ms / step" in out
    assert {p.name for p in tmp_path.iterdir()} == {"bench.md", "bench.csv", "bench.png"}


def test_bench_unknown_model_is_one_line(capsys):
    assert main(["bench", "--models", "DiT-Z"]) == 2
    assert "unknown model 'DiT-Z'" in capsys.readouterr().err
