"""The documentation: the generated configuration reference matches the parser, and every relative
link in README.md and docs/*.md reaches an existing file and, for ``page.md#anchor``, a heading."""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

# [text](target): a target without spaces; images ![..](..) match too, which is what we want.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(path):
    """The page's lines outside fenced code blocks (a shell snippet's brackets are not links)."""
    in_fence = False
    for line in open(path, encoding="utf-8"):
        if _FENCE.match(line.lstrip()):
            in_fence = not in_fence
        elif not in_fence:
            yield line


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for line in _prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            # GitHub numbers repeated headings: intro, intro-1, ...
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(path):
    for line in _prose_lines(path):
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: ...
                yield target


def test_slug_follows_github():
    assert _slug("Experiment: LoopRPT vs continued LM pre-training") == \
        "experiment-looprpt-vs-continued-lm-pre-training"
    assert _slug("Differences from the authors' trainers") == "differences-from-the-authors-trainers"
    assert _slug("Token-level RL: GRPO, RLTT and RPT") == "token-level-rl-grpo-rltt-and-rpt"
    assert _slug("`--async-save` and fully_parallel") == "--async-save-and-fully_parallel"


def test_configuration_reference_is_not_stale():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "config_reference.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    broken = []
    for target in _relative_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, REPO)}")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}")
    assert not broken, f"{os.path.relpath(page, REPO)}: " + "; ".join(broken)
