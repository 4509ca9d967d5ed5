"""Text files are read as people save them: a byte-order mark, Windows line ends; one that is not UTF-8 is named."""

import pytest

from causalvdm.utils.io import iter_jsonl, read_text

ROWS = '{"path": "a.mp4", "caption": "café at dawn"}\n\n{"path": "b.mp4", "caption": "東京"}\n'


@pytest.mark.parametrize("encoding, newline", [("utf-8", "\n"), ("utf-8-sig", "\n"), ("utf-8", "\r\n"),
                                               ("utf-8-sig", "\r\n")], ids=["plain", "bom", "crlf", "bom-crlf"])
def test_jsonl_reads_as_saved(tmp_path, encoding, newline):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(ROWS.replace("\n", newline).encode(encoding))
    assert list(iter_jsonl(path)) == [(1, {"path": "a.mp4", "caption": "café at dawn"}),
                                      (3, {"path": "b.mp4", "caption": "東京"})]


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.jsonl: line 2: not UTF-8 text"):
        read_text(path)
    with pytest.raises(ValueError, match=r"prompts.jsonl: line 2: not UTF-8 text"):
        list(iter_jsonl(path))
