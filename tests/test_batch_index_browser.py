"""The batch index page in Chromium: one row per entry, links to the reports, untrusted text inert."""

from __future__ import annotations

import pytest
from browser import chromium, open_report  # noqa: F401 - `chromium` is a fixture

from sparse_viz.analysis.batch import write_batch_index

HOSTILE = "</script><img src=x onerror=alert(1)>"


@pytest.mark.browser
def test_batch_index_lists_every_entry_with_links_and_hostile_text_stays_text(chromium, tmp_path):  # noqa: F811
    statuses = [
        {"name": "describe", "status": "ok", "rows": 120, "mask": "text", "files": ["report.html", "masking_results.csv"]},
        {"name": "broken", "status": "error", "error": f"image {HOSTILE} does not exist"},
    ]
    write_batch_index(tmp_path, statuses, config_path=f"prompts-{HOSTILE}.yaml", model_name="tiny")
    with open_report(chromium, tmp_path / "index.html") as report:
        page = report.page
        rows = page.locator("#entries tbody tr")
        assert rows.count() == 2
        assert [rows.nth(i).get_attribute("data-status") for i in range(2)] == ["ok", "error"]
        assert rows.nth(1).locator("td").nth(2).text_content() == f"image {HOSTILE} does not exist"
        hrefs = [a.get_attribute("href") for a in rows.nth(0).locator("a").all()]
        assert hrefs == ["describe/report.html", "describe/masking_results.csv"]
        assert page.locator("img").count() == 0
        assert HOSTILE in page.locator("#summary").text_content()
        report.screenshot("batch_index")
