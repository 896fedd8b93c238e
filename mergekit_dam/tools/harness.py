"""lm-evaluation-harness scores for `compare --lm-eval`: any lm-eval task, group or tag
(gsm8k, arc_challenge, the lab's `dam_lab`) run on every model through lm-eval's Python
API. lm-eval is the optional extra `eval`; its scores are kept as lm-eval names them
(`exact_match,none`: the metric, then the filter), so they read like lm-eval's own output.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from mergekit_dam.core.errors import DamError

INSTALL = "pip install mergekit-dam[eval]"


def require_lm_eval() -> None:
    """Fail before any model is scored when the optional extra is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DamError(f"dam: --lm-eval needs lm-evaluation-harness, which is not installed; {INSTALL}") from None


def task_names(value: str) -> List[str]:
    """The comma-separated TASKS of --lm-eval, passed to lm-eval as they are."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise DamError("dam: --lm-eval needs task names, e.g. --lm-eval gsm8k,arc_challenge")
    return names


def task_manager(tasks: List[str], include: Optional[str] = None):
    """lm-eval's task index (its own tasks plus those under `include`), after checking that it
    knows every task: a typo fails before the models are loaded, not after compare's scoring."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else ""
        raise DamError(f"dam: lm-eval has no task {', '.join(unknown)}{where}; `lm-eval ls tasks` lists them")
    return manager


def scores_of(entry: dict) -> Dict[str, float]:
    """One task's scores, without their standard errors or labels."""
    return {key: float(value) for key, value in entry.items()
            if "," in key and "_stderr," not in key and isinstance(value, (int, float))}


def headline_scores(output: dict) -> Dict[str, Dict[str, float]]:
    """{task: scores} of what was asked for: a group's own aggregate rather than its members
    (mmlu, not its 57 subjects), or its members where lm-eval aggregates none."""
    results, members = output["results"], output.get("group_subtasks", {})
    inside = {member for group, group_members in members.items() if group in results for member in group_members}

    def headline(name: str) -> List[str]:
        if name in members and not scores_of(results.get(name, {})):
            return [task for member in members[name] for task in headline(member)]
        return [name]

    return {task: scores_of(results[task]) for name in results if name not in inside for task in headline(name)}


def evaluate(models: Dict[str, str], tasks: List[str], manager, limit: Optional[int] = None,
             batch_size: str = "8") -> Dict[str, Dict[str, Dict[str, float]]]:
    """{model: {task: {metric: value}}}, each model loaded by lm-eval's `hf` backend."""
    import lm_eval
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(path: str) -> dict:
        return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": path}, tasks=tasks, task_manager=manager,
                                       device=device, batch_size=batch_size, limit=limit, log_samples=False)

    return {name: headline_scores(run(path)) for name, path in models.items()}


def lm_eval_columns(results: dict) -> List[Tuple[str, str]]:
    """(task, metric) of every lm-eval score, in the order of the first model's."""
    first = next(iter(results.values()))
    return [(task, metric) for task, metrics in first.get("lm_eval", {}).items() for metric in metrics]


def lm_eval_label(task: str, metric: str, separator: str = " ") -> str:
    """The task and the metric, with the filter only when there is one (lm-eval calls no filter `none`)."""
    return f"{task}{separator}{metric.removesuffix(',none')}"
