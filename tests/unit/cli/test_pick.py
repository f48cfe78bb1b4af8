"""``deltadist pick``: the checkpoint on meta, the page's selection as a config's ``delta:`` section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deltadist import AutoDeltaConfig, AutoDeltaModel
from deltadist.cli.main import main
from deltadist.cli.pick import meta_model
from tests.picking import picking
from tests.tiny import build_tiny

pytestmark = pytest.mark.timeout(120)
QUERY = "bert.encoder.layer.{}.attention.self.query".format


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    build_tiny("bert", "cls", num_hidden_layers=3).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_the_checkpoint_is_built_on_meta_as_its_architecture(checkpoint: Path) -> None:
    model = meta_model(str(checkpoint))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert all(p.is_meta for p in model.parameters())


def test_the_selection_is_printed_as_a_delta_section_that_configs_accept(checkpoint: Path) -> None:
    argv = ["pick", str(checkpoint), "--method", "lora", "--port", "0", "--timeout", "60"]
    with picking(lambda: main(argv)) as run:
        assert run.tree()["title"] == "LoraModel on BertForSequenceClassification"
        assert run.submit([QUERY(0), QUERY(1)])["ok"]
        assert run.result() == 0
    printed = run.printed.getvalue()
    section = "delta:\n  delta_type: lora\n  modified_modules: ['[r][01]\\.attention\\.self\\.query']\n"
    assert printed.endswith(section)
    # Pasted into a config, it selects exactly what was picked.
    config = AutoDeltaConfig.from_dict(yaml.safe_load(section)["delta"])
    delta = AutoDeltaModel.from_config(config, backbone_model=build_tiny("bert", "cls", num_hidden_layers=3))
    assert delta.sites == [QUERY(0), QUERY(1)]


@pytest.mark.parametrize(("args", "problem"), [
    (["--method", "lora"], "cannot read the checkpoint's config"),
    (["--method", "loraa"], "Unknown delta_type 'loraa'"),
    (["--method", "soft_prompt"], "modified_modules"),
    (["--method", "lora", "--port", "-3"], "interactive_modify must be"),
])
def test_bad_input_is_one_line_and_exit_status_2(checkpoint: Path, args, problem, capsys) -> None:
    path = str(checkpoint / "missing") if problem.startswith("cannot") else str(checkpoint)
    assert main(["pick", path, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltadist pick: error: ") and problem in err
