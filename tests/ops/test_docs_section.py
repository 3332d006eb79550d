"""replace_section: the measured block of a docs page is rewritten, the rest kept verbatim."""

from ops.docs_section import replace_section

START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def test_replaces_only_the_marked_block_and_keeps_backslashes_literal(tmp_path):
    page = tmp_path / "doc.md"
    page.write_text(f"intro\n{START}\nold\n{END}\noutro {START[:4]}\n")
    assert replace_section(page, START, END, r"new \d \1 |x|")
    assert page.read_text() == f"intro\n{START}\nnew \\d \\1 |x|\n{END}\noutro {START[:4]}\n"
    assert replace_section(page, START, END, "again")
    assert page.read_text() == f"intro\n{START}\nagain\n{END}\noutro {START[:4]}\n"


def test_missing_markers_append_with_title_and_are_left_alone_without(tmp_path):
    page = tmp_path / "doc.md"
    assert not replace_section(page, START, END, "x")
    assert not page.exists()
    assert replace_section(page, START, END, "x", title="Method")
    assert page.read_text() == f"# Method\n\n{START}\nx\n{END}\n"
    other = tmp_path / "other.md"
    other.write_text(f"text\n{END}\n{START}\n")  # end before start: not a section
    assert not replace_section(other, START, END, "x")
    assert other.read_text() == f"text\n{END}\n{START}\n"
