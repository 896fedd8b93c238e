"""Register `merge_method: dam` in any process that imports mergekit's merge methods.

mergekit 0.1.5 has no plugin entry points: its registry is filled when
`mergekit.merge_methods` is imported. `mergekit_dam.pth` imports this module at
interpreter start; it installs an import hook and nothing else (stdlib only, no torch,
no mergekit), so unrelated Python processes pay well under a millisecond. When
`mergekit.merge_methods` finishes executing, the hook imports `mergekit_dam`, whose
import registers the method; when `mergekit.merge` does, it wraps `run_merge` with the
checks a `dam` merge makes before mergekit reads anything (mergekit_dam.plugin.preflight),
before `mergekit-yaml` imports the name.
"""

import sys


def _register(module):
    if "mergekit_dam" in sys.modules:
        return  # mergekit_dam is being imported right now; it registers itself
    import mergekit_dam  # noqa: F401  (importing registers "dam")


def _guard(module):
    from mergekit_dam.plugin import preflight

    preflight.install()


_AFTER = {"mergekit.merge_methods": _register, "mergekit.merge": _guard}


def _then(name, exec_module):
    def exec_and_hook(module):
        exec_module(module)
        try:
            _AFTER[name](module)
        except Exception as error:  # never break mergekit for other methods
            import warnings

            warnings.warn(f"mergekit-dam could not hook into {name}: {error!r}")

    return exec_and_hook


class _RegisterDamFinder:
    pending = set(_AFTER)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in cls.pending:
            return None
        cls.pending.discard(name)  # once per module; also keeps the lookup below from recursing
        if not cls.pending:
            sys.meta_path.remove(cls)
        for finder in sys.meta_path:
            if finder is cls:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader.exec_module = _then(name, spec.loader.exec_module)
                return spec
        return None


if not all(name in sys.modules for name in _AFTER) and _RegisterDamFinder not in sys.meta_path:
    _RegisterDamFinder.pending = {name for name in _AFTER if name not in sys.modules}
    sys.meta_path.insert(0, _RegisterDamFinder)
