"""fuseseg's fusion side: the fusion-method registry (``fusion.registry``), learned fusion models
(``fusion.models``), classical baselines, fusing folders and arrays, and the fusion quality
metrics. It stands on the foundations in ``fuseseg`` (data layer, runtime helpers, errors).

Importing ``fusion`` is cheap: sub-modules are imported where they are used.
"""
