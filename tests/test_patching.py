"""steering.patching against brute force: one patch per forward pass through the bridge's own hook points
(``hook_resid_pre/post``, ``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_z``), written here independently of the
batched hooks on the plain model's modules, on tiny random models of four families in float64: pre-norm (Llama,
Qwen2), GPT-2 (Conv1D, fused QKV, learned positions) and post-norm (Gemma-2). Plus the refusals and the plot."""

import pytest
import torch

from probes.errors import WorkbenchError
from probes.models import load_model
from steering.patching import patch
from steering.patching_plots import patching_figure
from tests.numerics import FLOAT32_REL, rel_err

FAMILIES = ["llama", "qwen2", "gpt2", "gemma2"]
CLEAN = [5, 17, 3, 99, 42, 8]
CORRUPTED = [5, 17, 4, 99, 61, 8]  # differs at positions 2 and 4
FIRST_DIFF = 2  # before it both prompts hold the same activations (causal attention): a patch there changes nothing
ANSWERS = (11, 12)
BRIDGE_POINT = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
                "mlp_out": "hook_mlp_out", "head": "attn.hook_z"}
BOUND = 1e-8  # float64 on both sides: rounding gives ~1e-14 of the largest effect; a wrong site gives ~1


def _eager(name: str, dtype: str = "float64"):
    """``name`` with eager attention, as the bridge runs it: PyTorch's CPU SDPA rounds float64 at ~1e-8, which would
    hide the float64 agreement of the two sides."""
    model = load_model(name, device="cpu", dtype=dtype)
    model.hf_model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return _eager(f"random:{request.param}")


def _metric(model, ids, hooks=()) -> float:
    """The logit difference of ANSWERS at the last token, through the bridge with ``hooks``."""
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(hooks)):
        logits = model.bridge(torch.tensor([ids]))[0, -1].double()
    return float(logits[ANSWERS[0]] - logits[ANSWERS[1]])


def _clean(model, kind: str, ids=CLEAN) -> tuple[dict[int, torch.Tensor], float]:
    """The bridge's ``kind`` activation of every block on ``ids`` (first row), and the metric."""
    seen = {}

    def keep(layer):
        return lambda t, hook: seen.__setitem__(layer, t[0].detach().clone())
    metric = _metric(model, ids, [(f"blocks.{b}.{BRIDGE_POINT[kind]}", keep(b)) for b in range(model.n_layers)])
    return seen, metric


def _reference(model, kind: str, layer: int, where, clean: dict, ids=CORRUPTED, offset: int = 0,
               head: int | None = None) -> float:
    """The metric of ``ids`` with one site patched (``where``: a position or a list of positions patched together)."""
    where = torch.tensor(where if isinstance(where, list) else [where])

    def put(t, hook):
        t = t.clone()
        if head is None:
            t[0, where] = clean[layer][where + offset]
        else:  # hook_z: [batch, seq, heads, d_head]
            t[0, where, head] = clean[layer][where + offset, head]
        return t
    return _metric(model, ids, [(f"blocks.{layer}.{BRIDGE_POINT[kind]}", put)])


def _table(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _check(result, expected: torch.Tensor, bound: float = BOUND) -> None:
    effect, reference = result.values - result.corrupted_metric, expected - result.corrupted_metric
    assert reference.abs().max() > 1e-6, "the patches change nothing: the comparison would be empty"
    assert rel_err(effect, reference) < bound


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_batched_equals_one_patch_at_a_time(model, kind):
    result = patch(model, CLEAN, CORRUPTED, kind, answers=ANSWERS, batch_size=5, progress=False)
    (clean, clean_metric), corrupted = _clean(model, kind), _metric(model, CORRUPTED)
    expected = _table([[_reference(model, kind, b, p, clean) if p >= FIRST_DIFF else corrupted
                        for p in range(len(CORRUPTED))] for b in range(model.n_layers)])
    assert result.values.shape == (model.n_layers, len(CORRUPTED)) and result.dims == ("layer", "position")
    assert result.clean_metric == pytest.approx(clean_metric, rel=1e-9)
    assert result.corrupted_metric == pytest.approx(corrupted, rel=1e-9)
    _check(result, expected)


def test_heads_equal_one_patch_at_a_time(model):
    n_heads = model.bridge.cfg.n_heads
    clean = _clean(model, "head")[0]
    result = patch(model, CLEAN, CORRUPTED, "head", answers=ANSWERS, batch_size=5, progress=False)
    positions = list(range(len(CORRUPTED)))
    expected = _table([[_reference(model, "head", b, positions, clean, head=h) for h in range(n_heads)]
                       for b in range(model.n_layers)])
    assert result.dims == ("layer", "head")
    _check(result, expected)
    by_position = patch(model, CLEAN, CORRUPTED, "head", answers=ANSWERS, layers=[1], heads=[0, n_heads - 1],
                        positions=[2, -1], by_position=True, progress=False)
    expected = _table([[[_reference(model, "head", 1, p, clean, head=h) for p in (2, 5)]
                              for h in (0, n_heads - 1)]])
    assert by_position.dims == ("layer", "head", "position") and by_position.positions == [2, 5]
    _check(by_position, expected)


def test_normalized(model):
    """The stream leaving the last block at the last token decides the logits: patching it restores the clean
    metric (1); patching the stream entering block 0 where the prompts share their tokens changes nothing (0)."""
    last = patch(model, CLEAN, CORRUPTED, "resid_post", answers=ANSWERS, layers=[model.n_layers - 1],
                 positions=[-1], progress=False)
    assert float(last.normalized()[0, 0]) == pytest.approx(1.0, abs=1e-9)
    first = patch(model, CLEAN, CORRUPTED, "resid_pre", answers=ANSWERS, layers=[0], progress=False)
    assert first.normalized()[0, [0, 1, 3, 5]].abs().max() < 1e-9
    assert first.tokens[2] != first.clean_tokens[2] and first.tokens[0] == first.clean_tokens[0]


@pytest.fixture(scope="module")
def llama():
    return _eager("random:llama")


def test_lengths_must_match_or_be_aligned(llama):
    with pytest.raises(WorkbenchError, match=r"clean prompt has 7 tokens and the corrupted prompt 6") as err:
        patch(llama, [9, *CLEAN], CORRUPTED, answers=ANSWERS, progress=False)
    assert "align='last'" in str(err.value)
    with pytest.raises(WorkbenchError, match="unknown alignment"):
        patch(llama, [9, *CLEAN], CORRUPTED, answers=ANSWERS, align="middle", progress=False)


def test_align_last(llama):
    """A corrupted prompt two tokens longer: its first two positions have no clean counterpart (NaN); the others
    patch the clean token the same distance from the end."""
    corrupted = [9, 9, *CORRUPTED]
    result = patch(llama, CLEAN, corrupted, "resid_pre", answers=ANSWERS, layers=[1, 2], align="last",
                   progress=False)
    assert result.values[:, :2].isnan().all() and result.clean_tokens[:2] == [None, None]
    clean = _clean(llama, "resid_pre")[0]
    expected = _table([[_reference(llama, "resid_pre", b, p, clean, corrupted, offset=-2) for p in range(2, 8)]
                             for b in (1, 2)])
    effect = result.values[:, 2:] - result.corrupted_metric
    assert rel_err(effect, expected - result.corrupted_metric) < BOUND


def test_hybrid_layers_without_heads_are_refused():
    """LFM2: short convolutions in blocks 0 and 2, attention in block 1. Its attention output is patched through the
    bridge's hook_attn_out (no single module is known to hold it), its heads on the output projection."""
    hybrid = _eager("random:lfm2", "float32")  # float64 convolutions are slow on the CPU
    for kind in ("head", "attn_out"):
        with pytest.raises(WorkbenchError, match=r"block 0 of Lfm2ForCausalLM .* has no attention heads") as err:
            patch(hybrid, CLEAN, CORRUPTED, kind, answers=ANSWERS, layers=[0, 1], progress=False)
        assert "\n" not in str(err.value) and "conv" in str(err.value)
    heads = patch(hybrid, CLEAN, CORRUPTED, "head", answers=ANSWERS, progress=False)
    assert heads.layers == [1] and heads.values.shape == (1, hybrid.bridge.cfg.n_heads)
    clean = _clean(hybrid, "head")[0]
    expected = _table([[_reference(hybrid, "head", 1, list(range(6)), clean, head=h) for h in range(4)]])
    _check(heads, expected, FLOAT32_REL)
    attn = patch(hybrid, CLEAN, CORRUPTED, "attn_out", answers=ANSWERS, positions=[2, 4], progress=False)
    clean = _clean(hybrid, "attn_out")[0]
    _check(attn, _table([[_reference(hybrid, "attn_out", 1, p, clean) for p in (2, 4)]]), FLOAT32_REL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="head", heads=[4]), r"head 4 out of range: LlamaForCausalLM .* has 4 attention heads per layer, 0\.\.3"),
    (dict(kind="head", heads=[-1]), r"head -1 out of range"),
    (dict(layers=[3]), r"layer 3 out of range: random:llama has layers 0\.\.2"),
    (dict(kind="attn"), r"unknown patching kind 'attn'; choose one of resid_pre, resid_post, attn_out"),
    (dict(positions=[6]), r"position 6 out of range for the corrupted prompt of 6 tokens"),
    (dict(answers=(11, 10**9)), r"answers must be two token ids"),
    (dict(answers=None), r"give either answers"),
    (dict(metric=lambda logits: logits), r"metric must map logits \[batch, vocab\] to one value per row"),
    (dict(by_position=True), r"by_position applies to kind 'head'"),
])
def test_bad_input_one_line(llama, kwargs, message):
    kwargs = {"answers": ANSWERS, **kwargs}
    if "metric" in kwargs:
        kwargs["answers"] = None
    with pytest.raises(WorkbenchError, match=message) as err:
        patch(llama, CLEAN, CORRUPTED, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_figure(llama, tmp_path):
    result = patch(llama, CLEAN, CORRUPTED, "resid_pre", answers=ANSWERS, progress=False)
    fig = patching_figure(result)
    assert len(fig.data[0].x) == len(CORRUPTED) and list(fig.data[0].y) == ["L0", "L1", "L2"]
    assert "→" in fig.data[0].x[2] and not list(tmp_path.iterdir())
    heads = patch(llama, CLEAN, CORRUPTED, "head", answers=ANSWERS, layers=[2], progress=False)
    assert list(patching_figure(heads, normalized=False).data[0].x) == ["H0", "H1", "H2", "H3"]
    assert patching_figure(result, path=tmp_path / "patching.html") and (tmp_path / "patching.html").is_file()
