"""`medustore upgrade`: the golden format-1 archive converts into format 2 and answers exactly
what format 1 answered (its coded chunks are copied, not coded again)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import medustore
from medustore.archive.upgrade import upgrade
from medustore.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


@pytest.fixture
def format1(tmp_path: Path) -> Path:
    out = tmp_path / "old"
    with zipfile.ZipFile(FIXTURES / "format1-archive.zip") as zf:
        zf.extractall(out)
    return out


def test_upgrade_answers_as_format1(format1: Path, tmp_path: Path) -> None:
    expected = np.load(FIXTURES / "format1-unlearn-bob.npy")
    assert upgrade(format1, tmp_path / "new") == 3
    with medustore.open(tmp_path / "new") as store:
        assert store.rounds == [0, 1, 2]
        assert store.users == ["alice", "bob", 7]
        np.testing.assert_array_equal(store.unlearn(["bob"], out="flat"), expected)
        assert store.index.n_records == 9
    # The format-1 original is untouched and still refused.
    with pytest.raises(medustore.UnsupportedFormatError, match="format-1"):
        medustore.open(format1)


def test_upgrade_command(format1: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["upgrade", str(format1), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert "3 rounds" in result.output
    again = CliRunner().invoke(main, ["upgrade", str(format1), str(tmp_path / "new")])
    assert again.exit_code != 0 and "already holds data" in again.output


def test_upgrade_refuses_a_format2_archive(tmp_path: Path) -> None:
    with medustore.open(tmp_path / "a", "w", model=np.zeros(8, np.float32)):
        pass
    with pytest.raises(medustore.UnsupportedFormatError, match="not a format-1 archive"):
        upgrade(tmp_path / "a", tmp_path / "b")
