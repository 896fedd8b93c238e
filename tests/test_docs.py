"""The documentation a user reads.

docs/troubleshooting.md lists every one-line error the package can raise, and nothing
else: each DamError message (and each message a `*_problem` helper returns for one) is read
from the source, its f-string fields written as `…`, and must appear in the document verbatim.
README.md stays a product page (its length, its two first commands, its settings table) and
BENCHMARKS.md a page of current figures; every relative link of the pages resolves."""

import ast
import glob
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PACKAGE = os.path.join(ROOT, "mergekit_dam")
TROUBLESHOOTING = os.path.join(ROOT, "docs", "troubleshooting.md")
README = os.path.join(ROOT, "README.md")
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")


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


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def test_readme_and_benchmarks_stay_short():
    """README.md is the product page (at most 200 lines), BENCHMARKS.md the current figures
    (at most 300); the rest goes to docs/ and benchmarks/notes/."""
    assert len(read(README).split("\n")) <= 200
    assert len(read(BENCHMARKS).split("\n")) <= 300


def test_readme_starts_with_the_demo_and_the_test_command():
    """The README's first block: one command that sets up and runs the demo, then the one that
    sets up and runs the tests, which is what CI runs."""
    first = re.search(r"```bash\n(.*?)\n```", read(README), flags=re.DOTALL)
    assert first and read(README).index(first.group(0)) < read(README).index("\n## ")
    setup, tests = first.group(1).split("\n")
    assert setup.startswith("python3 -m venv .venv && ") and setup.endswith("mergekit-dam demo")
    assert tests == "bash .ci/run" and os.path.exists(os.path.join(ROOT, ".ci", "run"))


def test_readme_settings_are_settings_with_their_defaults():
    """The README's short table names real settings, with the defaults the code has."""
    from mergekit_dam.core.settings import DamSettings, ModelSettings
    from mergekit_dam.core.settings_table import _default_text

    text = read(README)
    section = text[text.index("## Settings you change") :]
    section = section[: section.index("\n## ")]
    rows = [line.split("|")[1:3] for line in section.split("\n") if line.startswith("| `")]
    fields = {**ModelSettings.model_fields, **DamSettings.model_fields}
    assert len(rows) >= 6
    for name, default in rows:
        name = name.strip().strip("`")
        assert name in fields, f"README names `{name}`, which is no setting"
        assert default.strip() == _default_text(fields[name].default), f"README's default of `{name}`"


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def pages():
    return [README, BENCHMARKS, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
            *sorted(glob.glob(os.path.join(ROOT, "benchmarks", "notes", "*.md")))]


def test_every_relative_link_resolves():
    """Links between the pages (and into the repository) name files that exist, and anchors
    headings that exist."""
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
            elif fragment and fragment not in {anchor(line) for line in read(resolved).split("\n") if line.startswith("#")}:
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_links_every_doc_and_benchmarks_every_notebook():
    readme, benchmarks = read(README), read(BENCHMARKS)
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        assert f"(docs/{os.path.basename(page)}" in readme, f"README.md does not link docs/{os.path.basename(page)}"
    notes = glob.glob(os.path.join(ROOT, "benchmarks", "notes", "*.md"))
    assert notes
    for page in notes:
        assert f"(benchmarks/notes/{os.path.basename(page)})" in benchmarks, f"BENCHMARKS.md does not link {page}"


def test_anchor_and_link_checks_see_breakage(tmp_path):
    """The link check is not empty by mistake."""
    assert anchor("## Parametrisation: weights or task vectors") == "parametrisation-weights-or-task-vectors"
    assert anchor("## What happens in a `dam` merge") == "what-happens-in-a-dam-merge"
    assert anchor("## Layer-wise mode (one small device)") == "layer-wise-mode-one-small-device"
    assert re.findall(r"\]\(([^)\s]+)\)", "see [a](docs/a.md#b) and [c](https://x.y)") == ["docs/a.md#b", "https://x.y"]
