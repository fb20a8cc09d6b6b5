"""wpk.settings: environment knobs read when used, bad values one line naming the variable."""
import pytest

from wpk import settings
from wpk.errors import WpkError


def test_knobs_are_read_when_used(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert settings.cache_dir() == tmp_path / "wpk"
    monkeypatch.setenv("WPK_POOL_SPIN_US", "7")
    assert settings.pool_spin_us() == 7
    monkeypatch.delenv("WPK_POOL_SPIN_US")
    assert settings.pool_spin_us() == 25


def test_the_partitioner_caches_calibration_under_the_cache_dir(monkeypatch, tmp_path):
    from wpk.partitioner.costs import _cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache_path() == tmp_path / "wpk" / "calibration.json"


def test_an_empty_variable_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.c_compiler() == "gcc"
    assert settings.cache_dir() == tmp_path / ".cache" / "wpk"


def test_a_malformed_number_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("WPK_POOL_PIN", "yes")
    with pytest.raises(WpkError, match=r"^environment variable WPK_POOL_PIN='yes': expected "
                                       r"a whole number$"):
        settings.pool_pin()


def test_core_and_partitioner_read_the_environment_only_through_settings():
    from pathlib import Path

    root = Path(settings.__file__).parent
    readers = [p for p in [*root.glob("*.py"), *(root / "partitioner").glob("*.py")]
               if p.name != "settings.py"
               and ("os.environ.get(" in p.read_text() or "getenv(" in p.read_text())]
    assert readers == []
