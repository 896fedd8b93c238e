"""Registration: the .pth hook in fresh interpreters, and `import mergekit_dam`."""

import subprocess
import sys

import pytest


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_unrelated_processes_import_neither_torch_nor_mergekit():
    out = run_python("import json, sys; print(sorted(m for m in ('torch', 'mergekit', 'mergekit_dam', '_mergekit_dam_autoload') if m in sys.modules))")
    assert out == "['_mergekit_dam_autoload']"


def test_importing_mergekit_methods_registers_dam_without_importing_the_plugin():
    out = run_python("import mergekit.merge_methods as m; print(m.get('dam').spec.name, m.get('linear').spec.name)")
    assert out == "dam linear"


def test_importing_the_plugin_first_registers_once():
    code = (
        "import mergekit_dam, mergekit_dam.plugin.registration as dm\n"
        "from mergekit.merge_methods import registered_methods\n"
        "dm.register(); dm.register()\n"
        "print([m.spec.name for m in registered_methods()].count('dam'))"
    )
    assert run_python(code) == "1"


def test_a_foreign_dam_method_is_not_replaced():
    from mergekit.merge_methods import registry

    import mergekit_dam.plugin.registration as dm

    ours = registry._METHODS.pop("dam")
    try:
        registry.register(type("Other", (), {"spec": type("S", (), {"name": "dam"})()})())
        with pytest.raises(RuntimeError, match="another plugin"):
            dm.register()
    finally:
        registry._METHODS["dam"] = ours


@pytest.mark.parametrize("imports", ["mergekit_dam", "mergekit.merge_methods", "mergekit.merge_methods, mergekit_dam"])
def test_importing_leaves_sys_excepthook_alone(imports):
    """The one-line DamError hook is installed when a dam merge runs, not on import."""
    code = f"import sys\nbefore = sys.excepthook\nimport {imports}\nimport mergekit.merge_methods as m\nprint(m.get('dam').spec.name, sys.excepthook is before)"
    assert run_python(code) == "dam True"
