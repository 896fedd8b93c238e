"""docs/troubleshooting.md lists every one-line error the package can raise, and nothing
else: each DamError message (and each message a `*_problem` helper returns for one) is read
from the source, its f-string fields written as `…`, and must appear in the document verbatim."""

import ast
import os
import re

PACKAGE = os.path.join(os.path.dirname(__file__), os.pardir, "mergekit_dam")
TROUBLESHOOTING = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "troubleshooting.md")


def pattern(node) -> str:
    """A message's text with every f-string field as `…` ("" where it is not a literal)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "…" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return pattern(node.left) + pattern(node.right)
    return ""


def raised_messages() -> dict:
    """{message pattern: "module.py:line"} of every DamError(...) with a literal message and
    every literal a `*_problem` function returns (its caller raises it as a DamError)."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            tree = ast.parse(open(path, encoding="utf-8").read())
            where = os.path.relpath(path, os.path.dirname(PACKAGE))
            for node in ast.walk(tree):
                messages = []
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DamError" and node.args:
                    messages.append((node.args[0], node.lineno))
                if isinstance(node, ast.FunctionDef) and node.name.endswith("_problem"):
                    messages += [(n.value, n.lineno) for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
                for message, line in messages:
                    text = pattern(message)
                    if text.strip("…"):
                        found.setdefault(text, f"{where}:{line}")
    return found


def documented() -> set:
    with open(TROUBLESHOOTING, encoding="utf-8") as handle:
        return set(re.findall(r"^- `` (.+) ``$", handle.read(), flags=re.MULTILINE))


def test_every_error_the_code_raises_is_in_troubleshooting():
    missing = {text: where for text, where in raised_messages().items() if text not in documented()}
    assert not missing, "add these to docs/troubleshooting.md:\n" + "\n".join(f"- `{t}`  ({w})" for t, w in missing.items())


def test_troubleshooting_lists_no_error_the_code_no_longer_raises():
    stale = documented() - set(raised_messages())
    assert not stale, f"docs/troubleshooting.md lists messages no code raises: {sorted(stale)}"


def test_the_extraction_sees_the_errors_it_should():
    """Not empty by mistake: errors of every stage, the composed dataset messages included."""
    found = raised_messages()
    assert len(found) > 60
    assert "dam: config file … does not exist; check the path" in found
    assert "… does not exist; fix the path" in found  # core/paths.dataset_file_problem
