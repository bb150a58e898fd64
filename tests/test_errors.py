"""Bad input fails early with a specific exception whose message names the problem and the fix."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import build, inputs_for

from hf_otfusion import FusionConfig, FusionError, fuse
from hf_otfusion.errors import (
    DepthMismatchError,
    EmptyAlignmentDataError,
    IncompatibleModelsError,
    LabelSetMismatchError,
    ModelTypeMismatchError,
    NonFiniteWeightsError,
    VocabularyMismatchError,
)


def test_different_model_types():
    with pytest.raises(ModelTypeMismatchError, match=r"different model types \['vit', 'deit'\].*share a model_type"):
        fuse([build("vit-cls"), build("deit-cls")], config=FusionConfig(cost="weights"))


def test_different_depths():
    with pytest.raises(DepthMismatchError, match="Parent 1 has 3 layers but the anchor .* has 2.*same depth"):
        fuse([build("vit-cls"), build("vit-cls", num_hidden_layers=3)], config=FusionConfig(cost="weights"))


def test_different_vocabularies():
    with pytest.raises(VocabularyMismatchError, match="vocabulary of 61 tokens but the anchor has 60.*share one"):
        fuse([build("bert-mlm"), build("bert-mlm", vocab_size=61)], config=FusionConfig(cost="weights"))


def test_different_label_sets():
    other = build("bert-seqcls")
    other.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(LabelSetMismatchError, match="predicts labels .*'neg'.*remap the classifier rows"):
        fuse([build("bert-seqcls"), other], config=FusionConfig(cost="weights"))


def test_different_model_classes():
    with pytest.raises(IncompatibleModelsError, match="same model class"):
        fuse([build("vit-cls"), build("vit-base")], config=FusionConfig(cost="weights", anchor=0))


def test_nan_weights():
    broken = build("vit-cls", seed=1)
    with torch.no_grad():
        broken.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"Parent 1 has NaN .* vit\.layers\.1\.mlp\.fc1\.weight"):
        fuse([build("vit-cls"), broken], config=FusionConfig(cost="weights"))


def test_activation_cost_without_data():
    with pytest.raises(EmptyAlignmentDataError, match="needs alignment data.*cost='weights'"):
        fuse([build("vit-cls"), build("vit-cls", seed=1)], data=None)


def test_activation_cost_with_empty_dataset():
    from datasets import Dataset

    empty = Dataset.from_dict({"pixel_values": []})
    with pytest.raises(EmptyAlignmentDataError, match="holds no rows"):  # found before any pass
        fuse([build("vit-cls"), build("vit-cls", seed=1)], data=empty, progress=False)


def test_activation_cost_with_all_padding():
    parent = build("bert-seqcls")
    inputs = inputs_for(parent)
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    with pytest.raises(EmptyAlignmentDataError):
        fuse([parent, build("bert-seqcls", seed=1)], data=[inputs], progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solver": "hungarian"}, r"solver='hungarian' is not one of \['exact', 'sinkhorn'\]"),
        ({"reg": 0.0}, "reg must be > 0"),
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"weights": [float("nan"), 1.0]}, r"FusionConfig.weights\[0\] must be finite, got nan"),
        ({"reg": "abc"}, r"FusionConfig.reg must be a number, got 'abc' \(str\)"),
        ({"sinkhorn_max_iter": -5}, "FusionConfig.sinkhorn_max_iter must be >= 1, got -5"),
        ({"batch_size": 2.5}, r"FusionConfig.batch_size must be an integer, got 2.5 \(float\)"),
        ({"num_samples": True}, "FusionConfig.num_samples must be an integer or None, got True"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(FusionError, match=message):
        FusionConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = FusionConfig(solver="sinkhorn", reg=0.1, weights=[1, 3])
    assert FusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(FusionError, match=r"Unknown FusionConfig key\(s\) \['regularisation'\]"):
        FusionConfig.from_dict({"regularisation": 0.1})


def test_weights_must_match_the_number_of_parents():
    with pytest.raises(FusionError, match="3 entries for 2 parents"):
        fuse(
            [build("vit-cls"), build("vit-cls", seed=1)],
            config=FusionConfig(cost="weights", weights=[1, 1, 1]),
        )


def test_single_parent():
    with pytest.raises(FusionError, match="at least 2 parents"):
        fuse([build("vit-cls")], config=FusionConfig(cost="weights"))


def test_the_readme_error_table_lists_every_fusion_error_with_its_exit_code():
    import inspect
    from pathlib import Path

    import hf_otfusion
    from hf_otfusion import errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "hf_otfusion.errors" in readme  # where the table says to import them from (only FusionError is top-level)
    assert hf_otfusion.FusionError is FusionError
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, FusionError):
            row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
            assert row is not None, f"README error table has no row for {name}"
            assert row.split(" | ")[-2] in ("2", "3"), row  # the exit column


# builtins each class is also an instance of (beyond ValueError, which FusionError is); classes not listed add none
BUILTINS = {
    "UnsupportedArchitectureError": LookupError,
    "NonFiniteWeightsError": ArithmeticError,
    "MissingDependencyError": ImportError,
    "ParentNotFoundError": FileNotFoundError,
    "UnknownRevisionError": LookupError,
    "CorruptCheckpointError": OSError,
    "UnsafeCheckpointError": PermissionError,
    "OutputExistsError": FileExistsError,
    "UnsafeOutputError": FileExistsError,
    "PushError": OSError,
    "UnsupportedTaskError": TypeError,
    "DeviceUnavailableError": RuntimeError,
    "HubServerStateError": RuntimeError,
}


def _error_classes():
    import inspect

    from hf_otfusion import errors

    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_is_a_fusion_error_and_its_builtin_with_keyword_only_attributes(cls):
    import inspect

    assert issubclass(cls, FusionError) and issubclass(cls, ValueError)
    error = cls("the message")
    assert str(error) == "the message"  # no builtin base rewrites the message (as KeyError's quotes would)
    if cls.__name__ in BUILTINS:
        assert isinstance(error, BUILTINS[cls.__name__])
    own = any("__init__" in vars(base) for base in cls.__mro__ if base.__module__ == cls.__module__)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:] if own else []  # past self, message
    for parameter in parameters:
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.{parameter.name}"
        assert parameter.default is None, f"{cls.__name__}.{parameter.name}"
        assert getattr(error, parameter.name) is None
        assert f"{parameter.name}:" in inspect.getdoc(cls), f"{cls.__name__} documents no {parameter.name}"
    if parameters:
        values = {parameter.name: f"value of {parameter.name}" for parameter in parameters}
        error = cls("the message", **values)
        assert all(getattr(error, name) == value for name, value in values.items())
    copy = pickle.loads(pickle.dumps(error))  # errors cross process boundaries (torchrun workers, subprocesses)
    assert type(copy) is cls and str(copy) == "the message" and vars(copy) == vars(error)


BARE = {"ValueError", "TypeError", "RuntimeError", "KeyError"}


def bare_raises(source: str, filename: str = "<source>") -> list[str]:
    """`file:line Name` for every `raise Name(...)` / `raise Name` of a builtin in BARE."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id in BARE:
                found.append(f"{filename}:{node.lineno} {target.id}")
    return sorted(found, key=lambda hit: int(hit.split(":")[-1].split()[0]))


def test_the_bare_raise_check_finds_bare_raises():
    source = "def f(x):\n    if x:\n        raise ValueError('x')\n    raise KeyError\n    raise SpecError('ok')\n"
    assert bare_raises(source) == ["<source>:3 ValueError", "<source>:4 KeyError"]


def test_no_bare_builtin_errors_are_raised_in_the_package():
    from pathlib import Path

    import hf_otfusion

    root = Path(hf_otfusion.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    found = [hit for path in files for hit in bare_raises(path.read_text(), str(path.relative_to(root.parent)))]
    assert found == [], "raise a specific hf_otfusion.errors class instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"solver": "hungarian"}, "solver"),
        ({"reg": 0.0}, "reg"),
        ({"weights": [1.0, -1.0]}, "weights"),
        ({"weights": [float("nan"), 1.0]}, "weights[0]"),
        ({"sinkhorn_max_iter": -5}, "sinkhorn_max_iter"),
        ({"method": "vanilla", "align": "ot"}, "align"),
        ({"target": "hidden_size=abc"}, "target['hidden_size']"),
    ],
)
def test_bad_config_values_name_their_field_and_value(kwargs, field):
    from hf_otfusion.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError) as caught:
        FusionConfig(**kwargs)
    assert caught.value.field == field
    assert caught.value.value is not None


def test_unknown_config_keys_and_an_anchor_out_of_range_are_invalid_config_errors():
    from hf_otfusion.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError) as caught:
        FusionConfig.from_dict({"regularisation": 0.1})
    assert caught.value.field == ["regularisation"] and caught.value.value == {"regularisation": 0.1}
    with pytest.raises(InvalidConfigError, match="anchor=5 is out of range") as caught:
        fuse([build("vit-cls"), build("vit-cls", seed=1)], config=FusionConfig(cost="weights", anchor=5))
    assert (caught.value.field, caught.value.value) == ("anchor", 5)


def test_incompatible_parents_carry_the_values_that_differ():
    with pytest.raises(ModelTypeMismatchError) as caught:
        fuse([build("vit-cls"), build("deit-cls")], config=FusionConfig(cost="weights"))
    assert caught.value.model_types == ["vit", "deit"]
    with pytest.raises(DepthMismatchError) as caught:
        fuse([build("vit-cls"), build("vit-cls", num_hidden_layers=3)], config=FusionConfig(cost="weights"))
    assert (caught.value.depths, caught.value.parent) == ((3, 2), 1)
    with pytest.raises(VocabularyMismatchError) as caught:
        fuse([build("bert-mlm"), build("bert-mlm", vocab_size=61)], config=FusionConfig(cost="weights"))
    assert caught.value.vocab_sizes == (61, 60)


def test_solver_errors_are_transport_errors():
    import numpy as np

    from hf_otfusion.engine.transport import TransportMap, solve_transport
    from hf_otfusion.errors import TransportError

    uniform = np.full(3, 1 / 3)
    with pytest.raises(TransportError, match="either a dense plan or a permutation"):
        TransportMap(None, uniform, uniform)
    with pytest.raises(TransportError, match="Unknown solver 'hungarian'") as caught:
        solve_transport(np.zeros((3, 3)), solver="hungarian")
    assert caught.value.solver == "hungarian"


def test_metric_input_errors_name_the_metric():
    from hf_otfusion.errors import MetricInputError
    from hf_otfusion.train.metrics import load_metric

    with pytest.raises(MetricInputError, match="average='median' is not one of") as caught:
        load_metric("f1").compute(predictions=[0, 1], references=[0, 1], average="median")
    assert (caught.value.metric, caught.value.value) == ("f1", "median")


def test_a_stopped_hub_server_cannot_start_again(tmp_path):
    from hf_otfusion.errors import HubServerStateError, UnsafeHostError
    from hf_otfusion.hub.server import HubServer

    server = HubServer(tmp_path)
    server.stop()
    with pytest.raises(HubServerStateError, match="was stopped") as caught:
        server.start()
    assert isinstance(caught.value, RuntimeError) and caught.value.state == "stopped"
    with pytest.raises(UnsafeHostError, match="loopback") as caught:
        HubServer(tmp_path, host="0.0.0.0")
    assert caught.value.host == "0.0.0.0"


def test_a_missing_data_source_and_an_unsafe_parent_carry_what_was_asked_for(tmp_path):
    from hf_otfusion.data import DataSource
    from hf_otfusion.errors import DataSourceError, UnsafeCheckpointError
    from hf_otfusion.hub.parents import resolve_parent

    with pytest.raises(
        DataSourceError, match="Data source 'nope/data' is a Hub id but Hub access is disabled"
    ) as caught:
        DataSource.resolve("nope/data")
    assert caught.value.source == "nope/data"

    parent = build("vit-cls")
    parent.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(parent.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="has only pickle weights") as caught:
        resolve_parent(str(tmp_path / "pickled"))
    assert isinstance(caught.value, PermissionError)
    assert (caught.value.path, caught.value.reason) == ("pytorch_model.bin", "pickle")
