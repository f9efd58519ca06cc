"""Every generated file of the repository is what `moe-watch generate` writes, and nothing
outside the tests imports them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from moe_watch.cli import main
from moe_watch.generate import generated_files, stale

pytest.importorskip("helm_python", reason="pip install -e '.[test]' (helm-python-sdk)")

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"Generated (by `moe-watch generate`|from moe_watch/)")


def test_every_generated_file_in_the_repository_is_fresh() -> None:
    outdated = stale(ROOT, generated_files())
    assert not outdated, f"run `moe-watch generate` and commit: {[str(p) for p in outdated]}"


def test_every_file_that_says_it_is_generated_is_generated() -> None:
    """A file whose header says `moe-watch generate` writes it, but which generate does not
    write (a renamed dashboard, a removed rules file), would go stale unseen."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    claims = {
        Path(name)
        for name in tracked
        if (ROOT / name).is_file()
        and not name.startswith(("moe_watch/", "tests/", "charts/moe-watch/templates/"))
        and HEADER.search((ROOT / name).read_text(encoding="utf-8", errors="replace")[:400])
    }
    assert claims
    assert claims <= set(generated_files())


def test_generate_writes_every_file_and_check_names_the_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--out", str(tmp_path), "--check"]) == 1  # nothing there yet
    capsys.readouterr()
    assert main(["generate", "--out", str(tmp_path)]) == 0
    files = generated_files()
    assert all((tmp_path / p).read_text() == text for p, text in files.items())
    assert main(["generate", "--out", str(tmp_path), "--check"]) == 0
    capsys.readouterr()
    (tmp_path / "docs/thresholds.md").write_text("edited by hand\n")
    assert main(["generate", "--out", str(tmp_path), "--check"]) == 1
    assert capsys.readouterr().out == (
        "stale: docs/thresholds.md (run `moe-watch generate` and commit)\n"
    )


def test_deploy_base_renders_the_chart_files_generate_writes_not_the_committed_ones() -> None:
    from moe_watch.generate.chart import BASE, base_files

    rule = Path("charts/moe-watch/files/prometheusrule.yaml")
    committed = (ROOT / rule).read_text()
    changed = committed.replace("MoEExpertSkewHigh", "MoEExpertSkewHighRenamed")
    assert "MoEExpertSkewHighRenamed" in base_files({rule: changed})[BASE / "moe-watch.yaml"]
    assert (ROOT / rule).read_text() == committed  # rendered from a copy


def test_production_and_docs_code_never_import_the_tests() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("moe_watch", "dashboards", "scripts", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"^\s*(from|import) tests\b", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []


def test_the_dashboards_alias_writes_the_dashboard_part_of_generate(tmp_path: Path) -> None:
    assert main(["dashboards", "--out", str(tmp_path)]) == 0
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    dashboards = {p for p in generated_files() if p.suffix == ".json"}
    assert written == dashboards
