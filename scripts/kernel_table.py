"""Print, write or check the kernel plan table of README.md and docs/hardware-and-kernels.md.

    python scripts/kernel_table.py                 print the table
    python scripts/kernel_table.py --write         replace the table in the docs
    python scripts/kernel_table.py --check         exit 1 when the docs table is stale

The table is generated from the kernel registries over every named profile (every optional
package assumed installed), the same as `finetune env --table`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.kernels.table import TABLE_END, TABLE_START, markdown_kernel_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "hardware-and-kernels.md")


def table_in_doc(text: str) -> str:
    """The table between the start and end markers of `text`."""
    start, end = text.index(TABLE_START), text.index(TABLE_END)
    return text[start + len(TABLE_START):end].strip("\n") + "\n"


def replace_table(text: str, table: str) -> str:
    """`text` with the table between its markers replaced by `table`."""
    start, end = text.index(TABLE_START), text.index(TABLE_END)
    return text[: start + len(TABLE_START)] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="update the documents in place")
    action.add_argument("--check", action="store_true", help="fail when a document is stale")
    parser.add_argument("--doc", type=Path, action="append",
                        help="a Markdown file with the markers (default: README and docs)")
    args = parser.parse_args(argv)
    docs = args.doc or list(DOCS)
    table = markdown_kernel_table()
    if args.write:
        for doc in docs:
            doc.write_text(replace_table(doc.read_text(), table))
            print(f"wrote the kernel table to {doc}")
        return 0
    if args.check:
        stale = [doc for doc in docs if table_in_doc(doc.read_text()) != table]
        for doc in stale:
            print(f"{doc} is stale; run python scripts/kernel_table.py --write", file=sys.stderr)
        return 1 if stale else 0
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
