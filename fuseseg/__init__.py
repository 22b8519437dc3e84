"""fuseseg's foundations: what every part of fuseseg stands on, and nothing that fuses or segments.

* :mod:`fuseseg.data` -- image and label I/O, pairing files by stem, data-set layouts (MSRS),
  validation, colour conversion, paths inside a run folder, the synthetic MSRS-like scenes;
* :mod:`fuseseg.runtime` -- devices, precision (autocast, channels-last), seeding, checkpoints;
* :mod:`fuseseg.errors` -- the errors that end as one line naming the file or key and the fix;
* :mod:`fuseseg.progress` -- progress bars on a terminal, plain timestamped lines in a log;
* :mod:`fuseseg.tblog` -- the trainers' CSV log and optional TensorBoard logging.

``fusion`` and ``segmentation`` import from here; this package imports neither (nor
``pipelines``). Its name is the project's own (the distribution and the command are ``fuseseg``),
so installing fuseseg adds no generic top-level name to site-packages.

Importing ``fuseseg`` is cheap: sub-modules are imported where they are used.
"""
