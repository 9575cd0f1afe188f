"""Print, write or check the kernel plan table of docs/hardware-and-kernels.md.

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

DOC = Path(__file__).resolve().parents[1] / "docs" / "hardware-and-kernels.md"


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
    action.add_argument("--write", action="store_true", help=f"update {DOC.name} in place")
    action.add_argument("--check", action="store_true", help=f"fail when {DOC.name} is stale")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file with markers")
    args = parser.parse_args(argv)
    table = markdown_kernel_table()
    if args.write:
        args.doc.write_text(replace_table(args.doc.read_text(), table))
        print(f"wrote the kernel table to {args.doc}")
        return 0
    if args.check:
        if table_in_doc(args.doc.read_text()) != table:
            print(f"{args.doc} is stale; run python scripts/kernel_table.py --write",
                  file=sys.stderr)
            return 1
        return 0
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
