"""Register `merge_method: dam` in any process that imports mergekit's merge methods.

mergekit 0.1.5 has no plugin entry points: its registry is filled when
`mergekit.merge_methods` is imported. `mergekit_dam.pth` imports this module at
interpreter start; it installs a one-shot import hook and nothing else (stdlib
only, no torch, no mergekit), so unrelated Python processes pay well under a
millisecond. When `mergekit.merge_methods` finishes executing, the hook imports
`mergekit_dam`, whose import registers the method.
"""

import sys

_TARGET = "mergekit.merge_methods"


def _register_after(exec_module):
    def exec_and_register(module):
        exec_module(module)
        if "mergekit_dam" in sys.modules:
            return  # mergekit_dam is being imported right now; it registers itself
        try:
            import mergekit_dam  # noqa: F401  (importing registers "dam")
        except Exception as error:  # never break mergekit for other methods
            import warnings

            warnings.warn(f"mergekit-dam could not register merge_method 'dam': {error!r}")

    return exec_and_register


class _RegisterDamFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(cls)  # one shot; also keeps the lookup below from recursing
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader.exec_module = _register_after(spec.loader.exec_module)
                return spec
        return None


if _TARGET not in sys.modules and _RegisterDamFinder not in sys.meta_path:
    sys.meta_path.insert(0, _RegisterDamFinder)
