"""docs/configuration.md is what the settings model generates, and says what the model says."""

from __future__ import annotations

from worker.config_reference import DOC_PATH, REGENERATE, render
from worker.settings import ENV_PREFIX, Settings, parse_status_ranges


def test_the_committed_reference_matches_the_settings_model() -> None:
    committed = DOC_PATH.read_text(encoding="utf-8")
    assert committed == render(), (
        f"{DOC_PATH.name} is out of date with worker/settings.py: run `{REGENERATE}`"
    )


def rows() -> dict[str, list[str]]:
    """Each table row of the rendered reference by its variable: the cells after the first."""
    table = {}
    for line in render().splitlines():
        if line.startswith(f"| `{ENV_PREFIX}"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            table[cells[0].strip("`")] = cells[1:]
    return table


def test_every_setting_has_a_row_named_by_its_variable() -> None:
    assert set(rows()) == {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def test_a_row_shows_the_type_default_bounds_and_description() -> None:
    table = rows()
    assert table["WORKER_CONCURRENCY"] == [
        "integer",
        "`16`",
        "≥ 1, ≤ 1000",
        "Messages in flight per replica (fresh ones prefetched: twice this)",
    ]
    assert table["WORKER_DELAY_BACKEND"][:2] == ["one of `auto`, `plugin`, `ttl`", "`auto`"]
    assert table["WORKER_PROVIDER_URL"][:2] == ["http(s) URL", "none"]
    assert "`^(debug\\|info\\|warning\\|error)$`" in table["WORKER_LOG_LEVEL"][2]


def test_the_retry_statuses_default_is_written_as_it_is_configured() -> None:
    written = rows()["WORKER_RETRY_STATUSES"][1].strip("`")
    assert written == "408,425,429,500-599"
    assert parse_status_ranges(written) == Settings.model_fields["retry_statuses"].default
