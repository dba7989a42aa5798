"""Render one self-contained HTML report from a jinja2 template and a JSON-able payload.

Every report extends `templates/base.html.j2`, which provides:
- the payload as `<script type="application/json" id="report-data">`, escaped by
  `json_for_script` so that no string in it (token text from untrusted prompts and corpora)
  can close the script element or inject markup; the page reads it with `JSON.parse`;
- D3 v7, inlined from the local copy installed by `scripts/setup.sh` when its sha256 matches,
  otherwise a CDN tag with an SRI hash; the page footer says which;
- the project's own JS/CSS files from `static/`, inlined.

Untrusted text must reach the DOM only through `textContent` / D3's `.text()`, never
`innerHTML` / `.html()`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

STATIC_DIR = Path(__file__).parent / "static"
TEMPLATES_DIR = Path(__file__).parent / "templates"
D3_LOCAL_PATH = STATIC_DIR / "vendor" / "d3.min.js"
D3_VERSION = "7.9.2"
D3_SHA256 = "912111098ea99503a6f4967361d2bbdc9dbf58cf9c678c8e27e5b02d1a07f0c1"
D3_CDN_URL = f"https://cdn.jsdelivr.net/npm/d3@{D3_VERSION}/dist/d3.min.js"
D3_CDN_SRI = "sha384-LxfWGZyh6PaLjBRPf7NWiEYs9Mn0UQ6ZmqbLLZhxlOBBNWF2a2K0Pfc5efkrNnhQ"

# Characters that could end a <script> element or start markup/comments inside one, and the
# two line separators that are valid JSON but not valid JavaScript source.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_for_script(data: Any) -> str:
    """JSON text that is safe as the body of `<script type="application/json">`.

    Args:
        data: JSON-able payload (dicts, lists, str, int, float, bool, None). NaN/inf become null.

    Returns:
        Compact JSON in which `<`, `>`, `&`, U+2028 and U+2029 are \\u-escaped, so the text can
        never contain `</script` or `<!--`; `JSON.parse` returns the original strings.
    """
    try:  # the common case has no NaN: skip the recursive walk (it dominates large payloads)
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


@dataclass(frozen=True)
class D3Source:
    """How a report gets D3: `tag` is the markup, `description` is shown in the page footer."""

    tag: str
    description: str
    inlined: bool


@lru_cache(maxsize=1)
def d3_source() -> D3Source:
    """Inline the local D3 copy when it exists and its sha256 matches, else use the CDN + SRI."""
    if D3_LOCAL_PATH.is_file():
        code = D3_LOCAL_PATH.read_bytes()
        if hashlib.sha256(code).hexdigest() == D3_SHA256:
            text = code.decode("utf-8")
            if "</script" not in text.lower():
                return D3Source(
                    tag=f"<script>{text}</script>",
                    description=f"D3 v{D3_VERSION} inlined from a local copy (sha256 verified)",
                    inlined=True,
                )
    return D3Source(
        tag=(
            f'<script src="{D3_CDN_URL}" integrity="{D3_CDN_SRI}" crossorigin="anonymous"></script>'
        ),
        description=f"D3 v{D3_VERSION} loaded from {D3_CDN_URL} (SRI-checked); no verified local copy",
        inlined=False,
    )


def _static_text(name: str) -> str:
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise ValueError(f"static/{name} must not contain a closing script/style tag")
    return text


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["static_text"] = _static_text
    return env


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates owner-only files; a report should get the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def render_html(template_name: str, *, title: str, data: Any, **context: Any) -> str:
    """Render a report template to a string.

    Args:
        template_name: a file in `report/templates/` that extends `base.html.j2`.
        title: page title (escaped).
        data: the payload the page's JS reads with
            `JSON.parse(document.getElementById("report-data").textContent)`.
        **context: extra template variables (autoescaped).
    """
    d3 = d3_source()
    template = _environment().get_template(template_name)
    return template.render(
        title=title,
        data_json=jinja2.utils.markupsafe.Markup(json_for_script(data)),
        d3_tag=jinja2.utils.markupsafe.Markup(d3.tag),
        d3_description=d3.description,
        **context,
    )


def render_report(template_name: str, output_path: Path, *, title: str, data: Any, **context: Any) -> Path:
    """Render a report template and write it atomically to `output_path`; returns the path."""
    return write_text_atomic(Path(output_path), render_html(template_name, title=title, data=data, **context))
