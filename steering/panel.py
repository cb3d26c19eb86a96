"""A steering panel for JupyterLab: try a direction or an SAE latent by hand, at any layer and strength.

    panel = from_session(model, refusal=direction, sae=sae, latents=[3475])
    panel      # as a cell's last line: prompt, direction picker, layer, strength, add / ablate, Generate

Generate shows the baseline and the steered completions side by side and how the next-token top-k moved. Trying
another strength is a slider move, not a cell edited and run again. The logic is :func:`steer` (and
:meth:`SteeringPanel.generate`, what the button runs), callable without a browser; the widgets only feed it.

Every direction is scaled to unit length, so the strength is the length of the vector added and a latent's decoder
row and a difference in means compare on one slider; the picker shows each direction's own length (a difference in
means added at its own length is Arditi et al.'s activation addition). Adding uses :func:`steering.hooks.add` (at
every position, entering the chosen block); ablating uses :func:`steering.hooks.ablate` (the direction projected out
of every write to the residual stream, so layer and strength do not apply).
"""

from __future__ import annotations

import contextlib
import html
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import ipywidgets as widgets
import pandas as pd
import torch

from probes.errors import WorkbenchError
from probes.forward import generate, next_token_logprobs
from probes.models import ModelHandle
from steering.hooks import ablate, add
from steering.sae import sae_hook_name

MODES = ("add", "ablate")
STEPS = ("baseline", "steered")  # what the progress bar counts


@dataclass
class SteeringResult:
    """One Generate: the completions without and with the edit, and how the next token's top-k moved (``top_k``:
    token, p baseline, p steered, change; the union of both top-k, most promoted first)."""

    prompt: str
    direction: str
    mode: str
    layer: int
    strength: float
    baseline: str
    steered: str
    top_k: pd.DataFrame

    @property
    def edit(self) -> str:
        """The edit in words, e.g. ``refusal added at layer 20, strength 102``."""
        if self.mode == "ablate":
            return f"{self.direction} ablated at every layer"
        return f"{self.direction} added at layer {self.layer}, strength {self.strength:.4g}"

    def html(self) -> str:
        """The two completions side by side and the top-k table, as HTML."""
        column = ("<div style='flex:1;min-width:0'><b>{title}</b><pre class='{css}' style='white-space:pre-wrap;"
                  "margin:4px 0'>{text}</pre></div>")
        table = self.top_k.to_html(index=False, classes="steering-topk", float_format="{:.3g}".format,
                                   formatters={"change": "{:+.3g}".format})
        baseline = column.format(title="baseline", css="steering-baseline", text=html.escape(self.baseline))
        steered = column.format(title=f"steered: {html.escape(self.edit)}", css="steering-steered",
                                text=html.escape(self.steered))
        return f"<div style='display:flex;gap:16px'>{baseline}{steered}</div><b>next token</b>{table}"


def check_direction(model: ModelHandle, name: str, vector: torch.Tensor) -> torch.Tensor:
    """``vector`` as a float tensor [d_model] on the CPU; a wrong shape, zero length or a NaN is refused in one
    line naming d_model and the width given."""
    vector = torch.as_tensor(vector).detach()
    if vector.dim() != 1 or vector.shape[0] != model.d_model:
        raise WorkbenchError(f"direction {name!r} has shape {list(vector.shape)}, width "
                             f"{vector.shape[-1] if vector.dim() else 0}: {model.name} needs one vector of width "
                             f"d_model={model.d_model}")
    vector = vector.float().cpu()
    norm = float(vector.norm())
    if not math.isfinite(norm) or norm == 0:
        raise WorkbenchError(f"direction {name!r} has length {norm}: it needs a finite, non-zero length")
    return vector


def latent_directions(sae: Any, latents: Sequence[int]) -> dict[str, torch.Tensor]:
    """The decoder rows of an SAE's ``latents`` (the direction each latent writes), named with the SAE's hook
    point; an index out of range is refused in one line."""
    d_sae = sae.cfg.d_sae
    bad = [i for i in latents if not 0 <= int(i) < d_sae]
    if bad:
        raise WorkbenchError(f"latent index {bad[0]} is out of range: the SAE has {d_sae} latents (0..{d_sae - 1})")
    hook = sae_hook_name(sae)
    return {f"latent {int(i)} ({hook})": sae.W_dec[int(i)].detach().float().cpu() for i in latents}


def next_token_change(baseline: torch.Tensor, steered: torch.Tensor, tokenizer: Any, k: int) -> pd.DataFrame:
    """The tokens in either top-``k`` of two next-token log-probability vectors [vocab], with both probabilities
    and the change, most promoted first."""
    p_base, p_steered = baseline.float().exp().cpu(), steered.float().exp().cpu()
    ids = list(dict.fromkeys(p_base.topk(k).indices.tolist() + p_steered.topk(k).indices.tolist()))
    frame = pd.DataFrame({"token": [repr(tokenizer.decode([i])) for i in ids],
                          "p baseline": p_base[ids].tolist(), "p steered": p_steered[ids].tolist()})
    frame["change"] = frame["p steered"] - frame["p baseline"]
    return frame.sort_values("change", ascending=False, ignore_index=True)


def _edit(model: ModelHandle, unit: torch.Tensor, mode: str, layer: int, strength: float) -> ContextManager:
    """The hook of ``mode``: ``strength`` times the unit vector added entering ``layer``, or the direction ablated."""
    if mode == "add":
        return add(model, unit, layer, strength)
    if mode == "ablate":
        return ablate(model, unit)
    raise WorkbenchError(f"mode must be one of {MODES}, got {mode!r}")


def steer(model: ModelHandle, prompt: str, vector: torch.Tensor, *, mode: str = "add", layer: int = 0,
          strength: float = 1.0, max_new_tokens: int = 24, top_k: int = 5, name: str = "direction",
          on_step: Callable[[str], None] | None = None) -> SteeringResult:
    """Greedy completions of the chat-formatted ``prompt`` as the model is and with ``vector`` (scaled to unit
    length) added at ``layer`` times ``strength`` or ablated, and the next-token top-k of both. ``on_step`` is
    called with each of :data:`STEPS` once done."""
    if not prompt.strip():
        raise WorkbenchError("the prompt is empty: type an instruction for the model")
    vector = check_direction(model, name, vector)
    edit = _edit(model, vector / vector.norm(), mode, layer, strength)
    texts, logprobs = {}, {}
    for step, context in zip(STEPS, (contextlib.nullcontext(), edit), strict=True):
        with context:
            texts[step] = generate(model, [prompt], max_new_tokens, progress=False)[0]
            logprobs[step] = next_token_logprobs(model, [prompt])[0]
        if on_step:
            on_step(step)
    return SteeringResult(prompt, name, mode, layer, float(strength), texts["baseline"], texts["steered"],
                          next_token_change(logprobs["baseline"], logprobs["steered"], model.tokenizer, top_k))


def error_line(error: BaseException) -> str:
    """An error as the one line the panel shows: its type and the first line of its message."""
    message = str(error).strip().split("\n", 1)[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class SteeringPanel:
    """The panel's controls wired to :func:`steer`. Display it as a cell's last line; ``widget`` is its box.

    ``directions``: name -> vector [d_model] (see :func:`latent_directions` for SAE latents). ``strength`` starts
    at the first direction's own length and the slider spans +-``max_strength`` (default twice the longest
    direction's length; pass it for unit-length latents alone). ``layer`` defaults to the middle block.
    """

    def __init__(self, model: ModelHandle, directions: Mapping[str, torch.Tensor], *, prompt: str = "",
                 layer: int | None = None, strength: float | None = None, max_strength: float | None = None,
                 max_new_tokens: int = 24, top_k: int = 5) -> None:
        if not directions:
            raise WorkbenchError("no direction to steer with: pass at least one, e.g. {'refusal': vector}")
        self.model, self.top_k = model, top_k
        self.directions = {name: check_direction(model, name, v) for name, v in directions.items()}
        lengths = {name: float(v.norm()) for name, v in self.directions.items()}
        layer = model.n_layers // 2 if layer is None else layer
        strength = next(iter(lengths.values())) if strength is None else strength
        max_strength = 2 * max(lengths.values()) if max_strength is None else max_strength
        if not 0 <= layer < model.n_layers:
            raise WorkbenchError(f"layer must be in 0..{model.n_layers - 1}, got {layer}")
        if not 0 < max_strength < math.inf or abs(strength) > max_strength:
            raise WorkbenchError(f"strength {strength} must lie within +-max_strength, a positive number "
                                 f"(got {max_strength})")
        self.runs, self.result, self.error = 0, None, None
        self._controls(lengths, prompt, layer, strength, max_strength, max_new_tokens)
        self.button.on_click(self._on_click)
        self.mode.observe(lambda _change: self._busy(False), "value")
        self._busy(False)

    def _controls(self, lengths: dict[str, float], prompt: str, layer: int, strength: float, max_strength: float,
                  max_new_tokens: int) -> None:
        style, wide = {"description_width": "initial"}, widgets.Layout(width="98%")
        self.prompt = widgets.Textarea(value=prompt, placeholder="An instruction to the model", description="prompt",
                                       rows=2, style=style, layout=wide)
        self.direction = widgets.Dropdown(options=[(f"{name}  (length {n:.3g})", name) for name, n in lengths.items()],
                                          description="direction", style=style, layout=widgets.Layout(width="50%"))
        self.mode = widgets.ToggleButtons(options=MODES, description="edit", style=style | {"button_width": "80px"})
        self.layer = widgets.IntSlider(value=layer, min=0, max=self.model.n_layers - 1, description="layer",
                                       style=style, continuous_update=False)
        self.strength = widgets.FloatSlider(value=strength, min=-max_strength, max=max_strength,
                                            step=max_strength / 100, description="strength", style=style,
                                            continuous_update=False, layout=widgets.Layout(width="50%"))
        self.max_new_tokens = widgets.BoundedIntText(value=max_new_tokens, min=1, max=1024, style=style,
                                                     description="max new tokens", layout=widgets.Layout(width="180px"))
        self.button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=len(STEPS), layout=widgets.Layout(display="none"))
        self.message, self.output = widgets.HTML(), widgets.HTML()
        self.widget = widgets.VBox([self.prompt, widgets.HBox([self.direction, self.mode]),
                                    widgets.HBox([self.layer, self.strength]),
                                    widgets.HBox([self.max_new_tokens, self.button, self.progress]),
                                    self.message, self.output])
        for control, css in ((self.widget, "steering-panel"), (self.strength, "steering-strength"),
                             (self.button, "steering-generate"), (self.progress, "steering-progress")):
            control.add_class(css)  # what a browser (tests/browser/check_browser.py) finds them by

    def _busy(self, busy: bool) -> None:
        """Every control disabled while generating; after, layer and strength only where they apply (add)."""
        for control in (self.prompt, self.direction, self.mode, self.max_new_tokens, self.button):
            control.disabled = busy
        for control in (self.layer, self.strength):
            control.disabled = busy or self.mode.value == "ablate"
        self.progress.layout.display = "" if busy else "none"

    def _step(self, step: str) -> None:
        self.progress.value += 1
        self.progress.description = f"{step} done"

    def generate(self) -> SteeringResult:
        """What Generate does: :func:`steer` with the controls' values, the controls disabled and a progress bar
        shown meanwhile; the result is shown in the panel and returned. Bad input raises."""
        self.message.value = ""
        self.progress.value, self.progress.description = 0, "generating"
        self._busy(True)
        try:
            result = steer(self.model, self.prompt.value, self.directions[self.direction.value], mode=self.mode.value,
                           layer=self.layer.value, strength=self.strength.value,
                           max_new_tokens=self.max_new_tokens.value, top_k=self.top_k, name=self.direction.value,
                           on_step=self._step)
        finally:
            self._busy(False)
        self.runs, self.result = self.runs + 1, result
        self.output.value = f"<div class='steering-result' data-run='{self.runs}'>{result.html()}</div>"
        return result

    def _on_click(self, _button: widgets.Button) -> None:
        """Generate from the button: an error is shown in one line (and kept in ``error``), not as a traceback."""
        try:
            self.generate()
            self.error = None
        except Exception as e:  # any failure: one line in the panel, the button usable again
            self.error, self.output.value = e, ""
            self.message.value = f"<span class='steering-error' style='color:#c00'>{html.escape(error_line(e))}</span>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def from_session(model: ModelHandle, *, sae: Any = None, latents: Sequence[int] = (), **named: torch.Tensor
                 ) -> SteeringPanel:
    """A panel over the session's directions by name (``refusal=vector``) and the decoder rows of ``sae``'s
    ``latents``, other settings at their defaults (set them on the controls, or build :class:`SteeringPanel`)."""
    if latents and sae is None:
        raise WorkbenchError("latents given without their SAE: pass sae=... too")
    return SteeringPanel(model, {**named, **(latent_directions(sae, latents) if sae is not None else {})})
