"""Count code lines: lines holding Python tokens, without docstrings, comments or blank lines.

    python scripts/code_lines.py [PATH ...] [--files]
    python scripts/code_lines.py --history BASE

Default paths: the Minitron core (megatron_prune/minitron, megatron_prune/common, megatron_prune/errors.py).
--files lists every file's count, largest first. --history counts the core at BASE and at every first-parent commit
after it, with each commit's change and subject: the attribution behind "the core is smaller" in docs/developers.md.
The core there is megatron_prune/ without FastNAS, GradNAS and the package's __init__/__main__, which is the same
files before Minitron's modules moved under megatron_prune/minitron/.
"""

import ast
import io
import pathlib
import subprocess
import sys
import tempfile
import tokenize

CORE = ("megatron_prune/minitron", "megatron_prune/common", "megatron_prune/errors.py")
NOT_CORE = ("fastnas", "gradnas", "__init__.py", "__main__.py")  # top-level entries of megatron_prune/
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


def count(roots) -> dict:
    """{file: code lines} of the .py files under `roots` (files or folders; a missing path counts nothing)."""
    files = sorted(f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py")))
    return {f: code_lines(f) for f in files}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def history(base: str) -> None:
    """One line per first-parent commit from `base` to HEAD: hash, core total, change from the previous line, subject."""
    commits = [base] + git("rev-list", "--first-parent", "--reverse", f"{base}..HEAD").split()
    previous = None
    for commit in commits:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "archive", commit, "megatron_prune"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            package = pathlib.Path(tmp, "megatron_prune")
            core = [p for p in package.iterdir() if p.name not in NOT_CORE and (p.is_dir() or p.suffix == ".py")]
            total = sum(count(core).values())
        change = "" if previous is None else f"{total - previous:+d}"
        print(f"{commit[:7]} {total:6d} {change:>5}  {git('log', '-1', '--format=%s', commit)[:100].strip()}")
        previous = total


def main(argv) -> None:
    if "--history" in argv:
        return history(argv[argv.index("--history") + 1])
    per_file = "--files" in argv
    counts = count([pathlib.Path(a) for a in argv if a != "--files"] or [pathlib.Path(p) for p in CORE])
    if per_file:
        for f, n in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"{n:6d}  {f}")
    print(f"{sum(counts.values()):6d}  total ({len(counts)} files)")


if __name__ == "__main__":
    main(sys.argv[1:])
