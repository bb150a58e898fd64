"""Passes replayed from each batch's kept input to a block of the layer stack (`engine.replay`) see what whole
passes see, and the fused-inputs refit built on them gives the very weights of whole passes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, inputs_for

from hf_otfusion import FusionConfig, fuse
from hf_otfusion.engine import replay as replay_module
from hf_otfusion.engine.distributed import models_on
from hf_otfusion.engine.passes import StopForward
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.repair import repair_model, repair_sites
from hf_otfusion.engine.replay import BlockReplay, block_index, layer_stack
from hf_otfusion.methods.fused_inputs import refit_linears

OPTIONS = FusionConfig(batch_size=8).statistics_options()
FAMILIES = ["bert-seqcls", "vit-cls", "deit-teacher"]


def _output_of(model, name: str, run) -> torch.Tensor:
    """The output of module `name` when `run()` runs the model; the pass stops there."""
    seen = []

    def hook(module, args, output):
        seen.append(output.detach().clone())
        raise StopForward

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        run()
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_replayed_pass_from_a_later_block_sees_the_activations_of_a_whole_pass(family):
    """Batch by batch (BERT's with padding), the second block's feed-forward output replayed from the kept
    input after `advance(1)` equals the one a whole forward pass gives, bit for bit."""
    model = build(family, seed=0).eval()
    batches = [inputs_for(model, seed=s) for s in range(3)]
    stack = layer_stack(model)
    assert stack is not None and stack.rsplit(".", 1)[-1] in {"layer", "layers"}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and block_index(stack, n) == 1]
    target = linears[-1]  # the block's last linear layer (its feed-forward output)
    kept = BlockReplay.for_model(model, batches[0])
    assert kept is not None
    for batch in batches:
        assert kept.add(batch, batch.get("attention_mask"))
    kept.advance(1)
    assert kept.position == 1
    for index, batch in enumerate(batches):
        with torch.inference_mode():
            whole = _output_of(model, target, lambda b=batch: model(**b))
            replayed = _output_of(model, target, lambda i=index: kept.run(i))
        assert torch.equal(whole, replayed)


def test_block_index_names_the_block_of_a_module_and_nothing_outside_the_stack():
    model = build("bert-seqcls")
    stack = layer_stack(model)
    assert stack == "bert.encoder.layer"
    assert block_index(stack, "bert.encoder.layer.1.attention.self.query") == 1
    assert block_index(stack, "bert.encoder.layer.0") == 0
    assert block_index(stack, "bert.pooler.dense") is None
    assert block_index(stack, "classifier") is None


@pytest.mark.parametrize(
    ("family", "sources"), [("bert-seqcls", 1), ("vit-cls", 1), ("deit-teacher", 1), ("bert-seqcls", 2)]
)
def test_the_refit_from_kept_block_inputs_gives_the_weights_of_whole_passes(family, sources, monkeypatch):
    """The refit run from kept block inputs writes the very weights (and errors) of the refit run with whole
    passes, and it did replay: most of its passes started at a block (counted), not at the embeddings."""
    parents = [build(family, seed=0), build(family, seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)
    if sources == 1:
        given = [([inputs_for(parents[0], seed=s) for s in range(3)], [(parents[0], 0.5), (parents[1], 0.5)])]
    else:
        given = [
            ([inputs_for(parents[0], seed=s) for s in range(2)], [(parents[0], 0.5)]),
            ([inputs_for(parents[0], seed=10 + s) for s in range(3)], [(parents[1], 0.5)]),
        ]
    replayed, whole = copy.deepcopy(fused), copy.deepcopy(fused)
    runs, past = [], []
    original, original_past = BlockReplay.run, BlockReplay.run_past_stack
    monkeypatch.setattr(BlockReplay, "run", lambda self, index: runs.append(index) or original(self, index))

    def counted_past(self, index, batch):
        past.append(index)
        return original_past(self, index, batch)

    monkeypatch.setattr(BlockReplay, "run_past_stack", counted_past)
    reports = refit_linears(replayed, given, OPTIONS, progress=False)
    replayed_runs, past_runs = len(runs), len(past)
    reference = refit_linears(whole, given, OPTIONS, progress=False, replay=False)
    assert (len(runs), len(past)) == (replayed_runs, past_runs)  # the whole passes replay nothing
    # the head after the stack (the classifier; BERT's pooler too) ran with the stack skipped, every model
    # (the fused one and its parents) on every batch
    after_stack = [r.layer for r in reports if block_index(layer_stack(fused), r.layer) is None]
    runs_per_layer = sum(len(data) * (1 + len(pairs)) for data, pairs in given)
    assert after_stack and past_runs == len(after_stack) * runs_per_layer
    # every layer inside the stack (all but the head's) ran each model from the kept inputs, on every batch
    stack = layer_stack(fused)
    in_stack = [r.layer for r in reports if block_index(stack, r.layer) is not None]
    assert len(in_stack) >= len(reports) - 3
    assert replayed_runs > 0
    for name, p in replayed.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[name]), name
    assert [(r.layer, r.error_before, r.error_after) for r in reports] == [
        (r.layer, r.error_before, r.error_after) for r in reference
    ]


def test_kept_inputs_past_their_byte_cap_fall_back_to_whole_passes(monkeypatch):
    """With a cap below one batch's hidden states, nothing is replayed and the refit still gives the weights of
    whole passes."""
    parents = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)
    given = [([inputs_for(parents[0], seed=s) for s in range(2)], [(parents[0], 0.5), (parents[1], 0.5)])]
    capped, whole = copy.deepcopy(fused), copy.deepcopy(fused)
    monkeypatch.setattr(replay_module, "MAX_BYTES", 16)
    runs = []
    original = BlockReplay.run
    monkeypatch.setattr(BlockReplay, "run", lambda self, index: runs.append(index) or original(self, index))
    refit_linears(capped, given, OPTIONS, progress=False)
    refit_linears(whole, given, OPTIONS, progress=False, replay=False)
    assert runs == []
    for name, p in capped.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[name]), name


class _Block(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear, self.scale = torch.nn.Linear(4, 4), scale

    def forward(self, hidden, gain):
        return self.linear(hidden) * gain


class _PerBlockArguments(torch.nn.Module):
    """A stack whose blocks each get their own argument: replaying them from the first block's would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block(1.0) for _ in range(3))

    def forward(self, x):
        for i, block in enumerate(self.layers):
            x = block(x, torch.tensor(float(i + 1)))
        return x


def test_a_stack_whose_blocks_take_their_own_arguments_is_not_replayed():
    assert BlockReplay.for_model(_PerBlockArguments(), {"x": torch.randn(2, 4)}) is None


def test_parents_run_again_for_each_group_when_their_outputs_would_pass_the_cap(monkeypatch):
    """With a cap that holds the kept inputs (ViT here: 3 batches x 8 x 17 positions x 32 x 4 bytes = 52 kB per
    model) but not the parents' outputs of a block (about 0.7 MB), the parents run from the kept inputs again
    for every group (more replayed runs) and the weights are still those of whole passes."""
    parents = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)
    given = [([inputs_for(parents[0], seed=s) for s in range(3)], [(parents[0], 0.5), (parents[1], 0.5)])]
    runs = []
    original = BlockReplay.run
    monkeypatch.setattr(BlockReplay, "run", lambda self, index: runs.append(index) or original(self, index))
    counts = {}
    for cap in (replay_module.MAX_BYTES, 200_000):
        monkeypatch.setattr(replay_module, "MAX_BYTES", cap)
        runs.clear()
        model = copy.deepcopy(fused)
        refit_linears(model, given, OPTIONS, progress=False)
        counts[cap] = (len(runs), model)
    (kept_runs, kept_model), (rerun_runs, rerun_model) = counts.values()
    whole = copy.deepcopy(fused)
    refit_linears(whole, given, OPTIONS, progress=False, replay=False)
    assert rerun_runs > kept_runs > 0
    for name, p in whole.named_parameters():
        assert torch.equal(p, dict(rerun_model.named_parameters())[name]), name
        assert torch.equal(p, dict(kept_model.named_parameters())[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_repair_from_kept_block_inputs_gives_the_weights_of_whole_passes(family, monkeypatch):
    """Repair measuring each site inside the stack from the kept inputs to its block writes the very weights
    (and reports) of repair with a pass from the embeddings per site, and it did replay: every site inside the
    stack ran from the kept inputs on every batch (counted)."""
    parents = [build(family, seed=0), build(family, seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)
    data = [inputs_for(parents[0], seed=s) for s in range(3)]
    plan = resolve_plan(fused)
    replayed, whole = copy.deepcopy(fused), copy.deepcopy(fused)
    runs = []
    original = BlockReplay.run
    monkeypatch.setattr(BlockReplay, "run", lambda self, index: runs.append(index) or original(self, index))
    pairs = [(parents[0], 0.25), (parents[1], 0.75)]
    reports = repair_model(replayed, plan, pairs, data, "all", OPTIONS, progress=False)
    replayed_runs = len(runs)
    reference = repair_model(whole, plan, pairs, data, "all", OPTIONS, progress=False, replay=False)
    assert len(runs) == replayed_runs  # the whole passes replay nothing
    stack = layer_stack(fused)
    in_stack = [site for site in repair_sites(plan, "all") if block_index(stack, site) is not None]
    assert len(in_stack) >= 2 * fused.config.num_hidden_layers and replayed_runs == len(in_stack) * len(data)
    assert [r.to_dict() for r in reports] == [r.to_dict() for r in reference]
    for name, p in replayed.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[name]), name
    assert any(not torch.equal(p, dict(fused.named_parameters())[n]) for n, p in replayed.named_parameters())


def _copying_to(module, *args, **kwargs):
    """`Module.to` as a move between devices behaves: every parameter gets new storage (here, on the host)."""
    for param in module.parameters():
        param.data = param.data.clone()
    return module


def test_models_on_keeps_what_the_block_wrote_into_a_changed_model_only(monkeypatch):
    """Each model gets its own tensors back (the same objects); the values written on the "device" reach them
    for the models listed as changed, and not for the others."""
    monkeypatch.setattr(torch.nn.Module, "to", _copying_to)
    changed, untouched = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [(m.weight, m.weight.detach().clone()) for m in (changed, untouched)]
    storage = changed.weight.data_ptr()
    with models_on([changed, untouched], torch.device("cpu"), changed=[changed]):
        assert changed.weight.data_ptr() != storage  # it did "move"
        with torch.no_grad():
            changed.weight.add_(1.0)
            untouched.weight.add_(1.0)
    assert changed.weight is before[0][0] and untouched.weight is before[1][0]
    assert changed.weight.data_ptr() == storage
    assert torch.equal(changed.weight, before[0][1] + 1.0)
    assert torch.equal(untouched.weight, before[1][1])


@pytest.mark.parametrize("stage", ["refit", "repair"])
def test_a_refit_or_repair_run_on_another_device_keeps_its_weights(stage, monkeypatch):
    """With the models moved to a "device" (new storage, as a GPU gives) the refit and repair write the very
    weights they write in place on the host: the changes made there are not dropped when the host tensors
    are put back."""
    parents = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    fused = fuse(parents, config=FusionConfig(method="vanilla"), progress=False)
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    pairs = [(parents[0], 0.5), (parents[1], 0.5)]
    on_host, on_device = copy.deepcopy(fused), copy.deepcopy(fused)

    def run(model, device):
        if stage == "refit":
            refit_linears(model, [(data, pairs)], OPTIONS, progress=False, device=device)
        else:
            repair_model(model, resolve_plan(model), pairs, data, "all", OPTIONS, progress=False, device=device)

    run(on_host, None)
    monkeypatch.setattr(torch.nn.Module, "to", _copying_to)
    run(on_device, torch.device("cpu"))
    assert any(not torch.equal(p, dict(fused.named_parameters())[n]) for n, p in on_host.named_parameters())
    for name, p in on_device.named_parameters():
        assert torch.equal(p, dict(on_host.named_parameters())[name]), name
