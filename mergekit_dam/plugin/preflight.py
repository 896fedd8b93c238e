"""What a `dam` merge checks before mergekit touches anything, and how its output appears.

mergekit's `run_merge` reads every input model's config first and writes the output
folder piece by piece, so a missing model ends in a hub-client traceback after retries,
and a failure late in the run (the model card's hub lookup, a full disk) leaves a
half-written folder. For configs that use `dam`, `guarded_run_merge` wraps it:

- every local dataset file exists, and every referenced model is a local checkpoint
  folder, or a hub id in the local cache or reachable now; otherwise one line, before
  anything is read or written;
- the output folder is written under a temporary name beside it and renamed into place
  only when mergekit has finished, so a failed run leaves nothing (when the folder
  already exists, mergekit writes into it as it always does);
- the model card mergekit writes gets a DAM section (card.py): data, training, and the
  coefficient artifact that reproduces the merge.

Other merge methods pass straight through. The wrapper is installed on
`mergekit.merge.run_merge` by the registration hook, before `mergekit-yaml` imports it.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid

from mergekit_dam.core.atomic import remove_orphans
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.paths import dataset_file_problem, is_local
from mergekit_dam.plugin.card import add_to_card, datasets_of
from mergekit_dam.plugin.one_line_errors import install_error_hook
from mergekit_dam.plugin.prepared import PREPARED


def uses_dam(config) -> bool:
    if getattr(config, "merge_method", None) == "dam":
        return True
    slices = list(getattr(config, "slices", None) or [])
    for module in (getattr(config, "modules", None) or {}).values():
        slices += list(getattr(module, "slices", None) or [])
    return any(getattr(s, "merge_method", None) == "dam" for s in slices)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)


def check_models(config, write_model_card: bool = False) -> None:
    """One line naming the first model mergekit could not read, and how to fix it."""
    for reference in config.referenced_models():
        path, revision = reference.model.path, reference.model.revision
        if _looks_local(path):
            folder = os.path.expanduser(path)
            if not os.path.isdir(folder):
                raise DamError(f"dam: model {path} does not exist (no such folder); fix the path or give a hub id")
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise DamError(f"dam: model folder {path} has no config.json; give a transformers checkpoint folder")
            if write_model_card and path.count("/") == 1 and not path.startswith((".", "/", "~")):
                _check_card_lookup(path)
            continue
        _check_hub_model(path, revision)


def check_datasets(config) -> None:
    """Local dataset paths that are not readable files, named before mergekit reads any model."""
    for model, dataset in datasets_of(config).items():
        problem = dataset_file_problem(dataset, model) if is_local(dataset) else None
        if problem:
            raise DamError(problem)


def _check_card_lookup(path: str) -> None:
    """mergekit's model card asks the hub whether a local `owner/name`-shaped path is also
    a repository, after the merge is written; offline that fails at the very end."""
    import huggingface_hub

    try:
        huggingface_hub.repo_exists(path, repo_type="model", token=False)
    except Exception as error:
        raise DamError(f"dam: mergekit's model card will look up the local folder {path} on the hub (it has the shape "
                       f"of a hub id) and the hub cannot be reached ({type(error).__name__}); write it as ./{path}, "
                       "or pass --no-write-model-card") from None


def _check_hub_model(repo: str, revision) -> None:
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return  # in the local cache: mergekit reads it from there
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise DamError(f"dam: model {repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                       f"download it first (hf download {repo}) or give a local folder")
    try:
        huggingface_hub.model_info(repo, revision=revision, timeout=10)
    except Exception as error:  # no network, no such repo, gated: the same fix
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise DamError(f"dam: model {repo} is neither a local folder nor in the Hugging Face cache, and the hub "
                       f"cannot provide it ({type(error).__name__}: {first[:160]}); download it first or give a local folder") from None


def guarded(run_merge):
    """`run_merge` with the checks and the all-or-nothing output above for dam configs."""
    if getattr(run_merge, "dam_guarded", False):
        return run_merge

    @functools.wraps(run_merge)
    def guarded_run_merge(merge_config, out_path, options, *args, **kwargs):
        if not uses_dam(merge_config):
            return run_merge(merge_config, out_path, options, *args, **kwargs)
        install_error_hook()
        check_datasets(merge_config)
        check_models(merge_config, getattr(options, "write_model_card", False))
        first, datasets = len(PREPARED.in_order), datasets_of(merge_config)  # before mergekit normalises the config

        def merge_into(folder):
            result = run_merge(merge_config, folder, options, *args, **kwargs)
            add_to_card(folder, datasets, PREPARED.in_order[first:])
            return result

        target = os.path.abspath(out_path)
        if os.path.exists(target):
            return merge_into(out_path)
        parent = os.path.dirname(target)
        try:
            os.makedirs(parent, exist_ok=True)
            remove_orphans(parent)  # staging folders of runs that were killed
            staging = os.path.join(parent, f".dam-partial-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            os.mkdir(staging)
        except OSError as error:
            raise DamError(f"dam: cannot create the output folder {out_path} ({_why(parent, error)}); choose a writable location") from None
        # the same base name inside, so that the model card names the model as asked
        inner = os.path.join(staging, os.path.basename(target))
        try:
            result = merge_into(inner)
            os.replace(inner, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    guarded_run_merge.dam_guarded = True
    return guarded_run_merge


def _why(folder: str, error: OSError) -> str:
    """The reason a folder cannot be made: a file in the way, or the OS's reason."""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return f"{folder} is a file, not a folder" if os.path.isfile(folder) else error.strerror or str(error)


def install() -> None:
    """Wrap `mergekit.merge.run_merge` (idempotent); the hook calls this as soon as
    mergekit.merge has executed, `register()` when it is already imported."""
    import sys

    module = sys.modules.get("mergekit.merge")
    if module is not None and hasattr(module, "run_merge"):
        module.run_merge = guarded(module.run_merge)
