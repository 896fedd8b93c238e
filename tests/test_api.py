"""The Python API's reading of a config (api.py): a path, a dict or a MergeConfiguration,
each problem in one line."""

import pytest
from mergekit.config import MergeConfiguration

from mergekit_dam.api import load_config, train
from mergekit_dam.core.errors import DamError

CONFIG = {"merge_method": "dam", "models": [{"model": "/a"}, {"model": "/b"}]}


def test_a_path_a_dict_and_a_configuration_read_the_same(tmp_path):
    import yaml

    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(CONFIG))
    given = MergeConfiguration.model_validate(CONFIG)
    copies = [load_config(str(path)), load_config(CONFIG), load_config(given)]
    assert all(copy.model_dump() == given.model_dump() for copy in copies) and copies[2] is not given


@pytest.mark.parametrize("content, message", [
    (None, "config file .* does not exist; check the path"),
    ("merge_method: [dam\n", "is not a readable YAML file"),
    ("merge_method: dam\nmodels: 3\n", "is not a valid mergekit config \\(models"),
])
def test_bad_configs_are_one_line(tmp_path, content, message):
    path = tmp_path / "c.yml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DamError, match=message):
        load_config(str(path))


def test_train_refuses_another_merge_method():
    with pytest.raises(DamError, match="merge_method is `linear`, not `dam`"):
        train({**CONFIG, "merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1}}]})
