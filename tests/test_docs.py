"""The Markdown docs stay true to the repository (fast: no model is built).

- every relative link in README.md and docs/**/*.md points at an existing file, and every
  ``#anchor`` (same file or another Markdown file) matches one of the target's headings, slugged
  the way GitHub does;
- every config, tool, benchmark, script or doc path the docs mention (``configs/x.yaml``,
  ``tools/x.py``, ...) exists;
- every key under ``MODEL.SLIM`` that ``add_slim_config`` defines appears, by its full dotted name,
  in docs/config.md, and every ``MODEL.SLIM.*`` name the docs mention still exists.

External links (``http://``, ``https://``, ``mailto:``, ...) are not checked.
"""
import os
import re
import unicodedata
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DOC = "docs/config.md"


def _markdown_files():
    files = ["README.md"] if os.path.isfile(os.path.join(ROOT, "README.md")) else []
    for folder, dirs, names in os.walk(os.path.join(ROOT, "docs")):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))  # _build: generated
        files += [os.path.relpath(os.path.join(folder, n), ROOT).replace(os.sep, "/")
                  for n in sorted(names) if n.endswith(".md")]
    return files


MARKDOWN_FILES = _markdown_files()


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------- Markdown parsing

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _lines_outside_code_blocks(text):
    """(line number, line) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and \
                len(match.group(1)) >= len(fence) and not line.strip()[len(match.group(1)):]:
            fence = None
        elif fence is None:
            yield number, line


_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


def _split_code_spans(line):
    """[(is_code, text)] pieces of a line: inline code spans and the text between them."""
    pieces, start = [], 0
    for match in _CODE_SPAN.finditer(line):
        pieces.append((False, line[start:match.start()]))
        pieces.append((True, match.group(2).strip() if match.group(2).strip() else match.group(2)))
        start = match.end()
    pieces.append((False, line[start:]))
    return pieces


_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def _heading_text(raw):
    """The text GitHub renders for a heading's Markdown (code kept, markup dropped)."""
    out = []
    for is_code, piece in _split_code_spans(raw):
        if not is_code:
            piece = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", piece)  # links and images: text
            piece = re.sub(r"<[^>]+>", "", piece)  # inline HTML
            piece = re.sub(r"(?<!\w)_(\S(?:.*?\S)?)_(?!\w)", r"\1", piece)  # _emphasis_
            piece = re.sub(r"\\(.)", r"\1", piece)  # backslash escapes
        out.append(piece)
    return "".join(out).strip()


def github_slug(text):
    """GitHub's anchor for a heading's text: lowercase; every character but letters, digits,
    marks, '_', '-' and spaces dropped; each space becomes '-'."""
    kept = []
    for char in text.lower():
        if char in " -_" or unicodedata.category(char)[0] in "LMN":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def heading_anchors(text):
    """Every anchor a Markdown file defines: its headings' slugs (a repeated slug gets -1, -2, ...,
    as on GitHub) and explicit HTML anchors (``<a name="...">``, ``id="..."``)."""
    headings = []
    previous = None  # (number, line) of the previous line outside code, for setext headings
    for number, line in _lines_outside_code_blocks(text):
        atx = _ATX.match(line)
        setext = _SETEXT.match(line)
        if atx:
            headings.append(_heading_text(atx.group(2) or ""))
        elif (setext and previous is not None and previous[0] == number - 1
              and previous[1].strip() and not _ATX.match(previous[1])
              and not previous[1].lstrip().startswith(("|", "-", "*", ">", "<"))):
            headings.append(_heading_text(previous[1].strip()))
        previous = (number, line)
    anchors, occurrences = set(), {}
    for heading in headings:
        base = slug = github_slug(heading)
        while slug in occurrences:
            occurrences[base] += 1
            slug = f"{base}-{occurrences[base]}"
        occurrences[slug] = 0
        anchors.add(slug)
    anchors.update(a for a in _HTML_ANCHOR.findall(text))
    return anchors


_INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_WHOLE_LINK = re.compile(r"!?\[[^\]]*" + _INLINE_LINK.pattern)  # [text](target), text too
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def markdown_links(text):
    """(line number, target) of every link and image outside code (inline, reference, HTML)."""
    links = []
    for number, line in _lines_outside_code_blocks(text):
        definition = _REFERENCE_DEFINITION.match(line)
        if definition:
            links.append((number, definition.group(1).strip("<>")))
            continue
        prose = "".join(piece for is_code, piece in _split_code_spans(line) if not is_code)
        links += [(number, m.group(1).strip("<>")) for m in _INLINE_LINK.finditer(prose)]
        links += [(number, target) for target in _HTML_LINK.findall(prose)]
    return links


_anchor_cache = {}


def _anchors_of(path):
    if path not in _anchor_cache:
        _anchor_cache[path] = heading_anchors(_read(path))
    return _anchor_cache[path]


def link_problems(doc):
    """What is wrong with the relative links of ``doc`` (a path relative to the repository)."""
    problems = []
    for number, target in markdown_links(_read(doc)):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        path = unquote(path)
        if not path:
            resolved = doc
        elif path.startswith("/"):
            resolved = os.path.normpath(path.lstrip("/"))
        else:
            resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path))
        resolved = resolved.replace(os.sep, "/")
        where = f"{doc}:{number}: link '{target}'"
        if resolved.startswith("../") or not os.path.exists(os.path.join(ROOT, resolved)):
            problems.append(f"{where}: {resolved} does not exist")
            continue
        if anchor and resolved.endswith(".md") and os.path.isfile(os.path.join(ROOT, resolved)):
            if unquote(anchor) not in _anchors_of(resolved):
                problems.append(f"{where}: {resolved} has no heading with the anchor "
                                f"#{anchor}")
    return problems


# A repository path as the docs mention it: configs/..yaml, tools/..py, benchmarks/..py,
# scripts/..sh|py, docs/..md; not the tail of a longer path (detectron2/tools/x.py, a URL, a
# relative link's ../configs/x.yaml, which the link check resolves).
_MENTION = re.compile(
    r"(?<![\w/.~-])((?:configs/[\w./-]+\.yaml|tools/[\w./-]+\.py|benchmarks/[\w./-]+\.py"
    r"|scripts/[\w./-]+\.(?:sh|py)|docs/[\w./-]+\.md))(?![\w/-])"
)


def mentioned_paths(text):
    """(line number, path) of every repository path mentioned outside links (the link check
    resolves those), code blocks included."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _REFERENCE_DEFINITION.match(line):
            continue  # a link: the link check resolves it
        line = _WHOLE_LINK.sub("", line)
        found += [(number, match.group(1)) for match in _MENTION.finditer(line)]
    return found


_SLIM_NAME = re.compile(r"(?<![\w.])MODEL\.SLIM(?:\.[A-Z][A-Z0-9_]*)*")


def slim_config_names():
    """(leaf keys, every node and key) under MODEL.SLIM of add_slim_config, as full dotted names."""
    from detectron2.config import CfgNode, get_cfg

    from slim_det.config import add_slim_config

    leaves, names = set(), {"MODEL.SLIM"}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}.{key}"
            names.add(name)
            if isinstance(value, CfgNode):
                walk(value, name)
            else:
                leaves.add(name)

    walk(add_slim_config(get_cfg()).MODEL.SLIM, "MODEL.SLIM")
    return leaves, names


# ---------------------------------------------------------------------------------------- tests


def test_docs_exist():
    for doc in ("docs/config.md", "docs/design.md"):
        assert doc in MARKDOWN_FILES, f"{doc} is missing"


@pytest.mark.parametrize("doc", MARKDOWN_FILES)
def test_relative_links_and_anchors_resolve(doc):
    problems = link_problems(doc)
    assert not problems, f"{len(problems)} broken links in {doc}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", MARKDOWN_FILES)
def test_mentioned_configs_tools_and_scripts_exist(doc):
    problems = [f"{doc}:{number}: mentions {path}, which does not exist"
                for number, path in sorted(set(mentioned_paths(_read(doc))))
                if not os.path.isfile(os.path.join(ROOT, path))]
    assert not problems, f"{len(problems)} missing files named in {doc}:\n" + "\n".join(problems)


def test_every_slim_key_is_documented_in_config_md():
    leaves, _ = slim_config_names()
    text = _read(CONFIG_DOC)
    missing = sorted(key for key in leaves
                     if not re.search(re.escape(key) + r"(?![A-Za-z0-9_])", text))
    assert not missing, (f"{CONFIG_DOC} does not document these keys of add_slim_config (write "
                         f"each full dotted name): {missing}")


@pytest.mark.parametrize("doc", MARKDOWN_FILES)
def test_every_documented_slim_key_exists(doc):
    _, names = slim_config_names()
    unknown = [f"{doc}:{number}: {name}"
               for number, line in enumerate(_read(doc).splitlines(), start=1)
               for name in _SLIM_NAME.findall(line) if name not in names]
    assert not unknown, (f"{doc} names MODEL.SLIM keys that add_slim_config does not define "
                         "(renamed or removed?):\n" + "\n".join(unknown))


# ------------------------------------------------------------------- the checker checks itself


def test_github_slugs():
    text = "\n".join([
        "# slim_det — slimmable networks for detectron2",
        "## `MODEL.SLIM`: the slimmable model",
        "## Results (box AP, 3 seeds)",
        "## Results (box AP, 3 seeds)",
        "## Results (box AP, 3 seeds)",
        "### [Deploy](deploy.md) a *width*",
        "```",
        "# not a heading",
        "```",
        "Setext heading",
        "--------------",
        '<a name="custom"></a>',
    ])
    assert heading_anchors(text) == {
        "slim_det--slimmable-networks-for-detectron2",
        "modelslim-the-slimmable-model",
        "results-box-ap-3-seeds",
        "results-box-ap-3-seeds-1",
        "results-box-ap-3-seeds-2",
        "deploy-a-width",
        "setext-heading",
        "custom",
    }


def test_links_and_mentions_are_found():
    text = "\n".join([
        "See [the config](docs/config.md#modelslimwidths), ![plot](img/a.png) and [web](https://x).",
        "`[not a link](nowhere.md)` and [a reference][ref], [tools/x.py](tools/x.py)",
        "[ref]: docs/design.md",
        "```",
        "[in code](nowhere.md)",
        "python tools/train_net.py --config-file configs/shapes/slim_mask_rcnn_shapes.yaml",
        "```",
        "detectron2's projects/x/tools/train_net.py and https://github.com/a/b/configs/c.yaml",
    ])
    assert [t for _, t in markdown_links(text)] == [
        "docs/config.md#modelslimwidths", "img/a.png", "https://x", "tools/x.py", "docs/design.md"]
    assert sorted(p for _, p in mentioned_paths(text)) == [
        "configs/shapes/slim_mask_rcnn_shapes.yaml", "tools/train_net.py"]
