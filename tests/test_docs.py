"""The documentation says what is there: its links resolve, and its curl walkthrough runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO, ServerProcess, process_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCS, ids=lambda path: path.name)
def test_every_link_and_named_file_is_in_the_repository(document):
    """Relative links resolve, and no text sends the reader to a file the repository does not have
    (such as notes kept outside it)."""
    text = document.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    for target in targets:
        if not re.match(r"[a-z]+:", target):
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which is not there"
    for named in re.findall(r"`((?:reference|docs|deploy|construct|tests)/[\w./-]+\.(?:md|py|json|sql|conf))`", text):
        assert (REPO / named).exists() or (document.parent / named).exists(), f"{document.name} names {named}"


def _walkthrough() -> str:
    text = (REPO / "docs" / "protocol.md").read_text()
    section = text.split("### 9.1 A walkthrough with curl\n", 1)[1].split("\n---\n", 1)[0]
    return "\n".join(block.split("```", 1)[0] for block in section.split("```sh\n")[1:])


@pytest.mark.integration
def test_the_curl_walkthrough_of_protocol_md_runs(tmp_path):
    """docs/protocol.md §9.1, block by block in one shell: two users, a message, its acknowledgement."""
    server = ServerProcess(tmp_path, "--data-dir", "data", "--bcrypt-cost", "4").start()
    try:
        env = process_env(SERVER=f"http://127.0.0.1:{server.ports['http']}",
                          PATH=f"{Path(sys.executable).parent}:{process_env()['PATH']}")
        (tmp_path / "walk").mkdir()
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _walkthrough()], cwd=tmp_path / "walk",
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith('{"userId":"') and '"supportedSuites":[{"suiteId":1' in lines[0]
    assert '"status":"queued"' in lines[1]
    assert lines[2:] == ["not really encrypted", '{"messages":[]}']
