"""fuseseg's fusion side: the fusion-method registry, fusion models and classical baselines,
fusion quality metrics, and the shared data layer (``fusion.data``) and runtime helpers
(``fusion.runtime``).

Importing ``fusion`` is cheap: sub-modules are imported where they are used.
"""
