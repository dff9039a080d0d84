"""densecap.tables.read_table: one pandas reader; bad files fail naming the file."""

import pytest

from d2s.config import ConfigError
from densecap.tables import read_table


def test_empty_csv_is_an_empty_table(tmp_path):
    (tmp_path / "caps.csv").write_text("")
    assert len(read_table(tmp_path / "caps.csv", "captions file")) == 0


def test_malformed_csv_names_the_file(tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text('image,caption\na.png,"one"\nb.png,"two","three","four"\n')
    with pytest.raises(ConfigError, match=r"captions file: .*caps\.csv"):
        read_table(f, "captions file")
