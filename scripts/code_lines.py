"""Count code lines: lines holding Python tokens, without docstrings, comments or blank lines.

    python scripts/code_lines.py [PATH ...] [--files]

Default paths: the Minitron core (megatron_prune/minitron, megatron_prune/common, megatron_prune/errors.py).
--files lists every file's count, largest first. The measure behind "the core is smaller" in docs/developers.md.
"""

import ast
import io
import pathlib
import sys
import tokenize

CORE = ("megatron_prune/minitron", "megatron_prune/common", "megatron_prune/errors.py")
SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def docstring_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(path: pathlib.Path) -> int:
    source = path.read_text()
    docs = docstring_lines(ast.parse(source))
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SKIPPED:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docs)
    return len(lines)


def main(argv) -> None:
    per_file = "--files" in argv
    roots = [pathlib.Path(a) for a in argv if a != "--files"] or [pathlib.Path(p) for p in CORE]
    files = sorted(f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py")))
    counts = {f: code_lines(f) for f in files}
    if per_file:
        for f, n in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"{n:6d}  {f}")
    print(f"{sum(counts.values()):6d}  total ({len(files)} files)")


if __name__ == "__main__":
    main(sys.argv[1:])
