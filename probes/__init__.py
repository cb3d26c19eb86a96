"""Reading models: loading them, extracting activations, and the probing experiments.

Three kinds of module live here:

- The engine that reads a model, which ``steering`` uses too: ``models`` (:func:`probes.models.load_model`, the
  :class:`probes.models.ModelHandle`), ``random_models`` (seeded random test models), ``architecture``, ``forward``
  (token ids, padding, logits, losses, generation), ``cache`` (:func:`probes.cache.extract`), ``positions``,
  ``datasets`` and ``distributed``.
- The probing experiments: ``linear`` (probes), ``metrics``, ``space_time`` (+ ``space_time_plots``), ``conflict``
  (knowledge-conflict data), and ``extract``, the command line ``python -m probes.extract`` (also under torchrun),
  which calls the function :func:`probes.cache.extract`: the module is the CLI, the function the engine.
- The workbench's shared base, used by every module and CLI in ``probes`` and ``steering`` alike and not about
  probing: ``files`` (atomic writes, run folders), ``report`` (report pages), ``cli_args`` (flags, user errors),
  ``settings`` (experiment settings and the command line built from them), ``errors``, ``readers`` (reading files,
  naming the remedy when one is corrupt), ``progress`` (progress bars), ``devices`` (models spread over devices) and
  ``provenance`` (weights fingerprints).

``probes`` never imports ``steering``. What each command writes in ``results.json`` is in ``docs/results.md``.
"""
