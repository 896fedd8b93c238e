"""Ship the registration hook at the root of site-packages.

A `.pth` file only runs when it sits directly in site-packages, and hatchling's
editable wheels do not copy package data there, so both wheel kinds get the two
files explicitly.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HOOK_FILES = {
    "autoload/mergekit_dam.pth": "mergekit_dam.pth",
    "autoload/_mergekit_dam_autoload.py": "_mergekit_dam_autoload.py",
}


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {}).update(HOOK_FILES)
