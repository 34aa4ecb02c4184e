"""TorchX components: one per stage (`torchx run -s kubernetes jobs/pretrain.py:pretrain ...`).

Installed, they are registered under the ``dinoforge`` entry point of ``torchx.components``, and
TorchX 0.7.0 names a component ``<entry point>.<module>.<function>``: ``dinoforge.curate.curate``,
``dinoforge.pretrain.pretrain``, ``dinoforge.distill.distill``, ``dinoforge.evaluate.evaluate``
(``torchx builtins`` lists them). Shorter names cannot come from re-exporting the functions here:
TorchX's linter looks for each function's ``def`` in the file of the module it was found in, and
marks a re-exported one "not found", which hides it.
"""
